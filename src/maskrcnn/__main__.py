from maskrcnn.cli import main

raise SystemExit(main())
