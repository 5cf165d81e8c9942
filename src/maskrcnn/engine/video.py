"""Video files in and out with PyAV (FFmpeg's libraries, shipped inside its wheels).

`VideoReader(path).batches(n)` yields lists of `(frame index, time in seconds, float32 [3, H, W]
in 0-1)`; `VideoWriter(path, fps=...)` encodes `uint8 [3, H, W]` frames as H.264 (yuv420p, which
needs even sizes: an odd height or width gets one black row or column).
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import torch
import torch.nn.functional as F


class VideoReader:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._container = av.open(str(self.path))
        except av.FFmpegError as error:
            raise ValueError(f"{self.path}: {error}") from None
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"{self.path}: has no video stream")
        stream = self._container.streams.video[0]
        self._stream = stream
        self.fps = float(stream.average_rate or stream.guessed_rate or 25)
        self.width, self.height = int(stream.codec_context.width), int(stream.codec_context.height)

    def batches(self, size: int) -> Iterator[list[tuple[int, float, torch.Tensor]]]:
        batch: list[tuple[int, float, torch.Tensor]] = []
        for index, frame in enumerate(self._container.decode(self._stream)):
            time = float(frame.time) if frame.time is not None else index / self.fps
            pixels = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float().div_(255.0)
            batch.append((index, time, pixels))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()


class VideoWriter:
    def __init__(self, path: str | Path, *, fps: float) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._rate = Fraction(fps).limit_denominator(1001)
        self._stream = None

    def write(self, frame: torch.Tensor) -> None:
        """One `uint8 [3, H, W]` frame; the first frame fixes the size."""
        height, width = frame.shape[-2:]
        frame = F.pad(frame, (0, width % 2, 0, height % 2))  # yuv420p: even sizes
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=self._rate)
            self._stream.width, self._stream.height = frame.shape[-1], frame.shape[-2]
            self._stream.pix_fmt = "yuv420p"
        picture = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
        for packet in self._stream.encode(picture):
            self._container.mux(packet)

    def close(self) -> Path:
        if self._stream is not None:
            for packet in self._stream.encode():  # flush the encoder's delayed frames
                self._container.mux(packet)
        self._container.close()
        return self.path
