"""Stage 1 on DALI: encoded bytes -> `decoders.image` -> shrink -> pad -> `DecodedBatch`.

Graph (one per loader, built once): external_source("encoded" uint8 bytes, "sizes" float32 (h', w'))
-> `fn.decoders.image(device="mixed")` (nvJPEG / the hardware decoder) on a GPU, `device="cpu"` and
`device_id=None` without one -> `fn.resize(size=sizes, antialias=True)` -> `fn.pad` to S x S. The
output is one dense [B, S, S, 3] uint8 tensor, handed to torch with `feed_ndarray` on the current CUDA
stream (GPU) or copied from DALI's buffer (CPU).

Decisions:
- Both inputs go through `external_source`, for `.beton` *and* folders (bytes read with
  `np.fromfile`). The loader owns the order (one permutation per (seed, epoch), sharded by rank,
  resumable at any batch), and feeding the exact index list keeps every backend on the same samples.
  DALI's `readers.file` would own shuffling and sharding itself, and a broken file there fails the
  pipeline deep inside DALI; reading a file's bytes in Python costs far less than decoding it.
- Target sizes come from `canvas.canvas_extent` (the same rule as the torch backends), computed on the
  host from the `.beton`'s stored heights/widths or, for folders, from the image header (PIL reads the
  header only). `adjust_orientation=False` so the decoded size is the header's (torchvision and PIL
  do not apply EXIF orientation either).
- Bad records: a `.beton` record whose crc32 does not match (`source.RecordVerifier`, in this reading
  thread, before DALI sees the bytes) or a header PIL cannot parse is skipped first. This matters:
  DALI's CPU decoder (libjpeg-turbo) decodes mid-stream damage into garbage pixels with only a libjpeg
  warning ("Corrupt JPEG data: premature end of data segment"), so with `verify_crc` off such a record
  reaches the views (tests/test_pipeline_crc.py shows it). A record that fails inside the decoder
  invalidates the DALI pipeline ("Current pipeline object is no longer valid"), so the pipeline is
  rebuilt (a few ms on CPU) and that batch is decoded record by record to find the bad ones; they are
  dropped and returned as (index, reason), and the batch shrinks by that many (never padded with other
  samples, which would break the order and the shards).
- Hand-over to torch (GPU): `feed_ndarray` copies DALI's output buffer into a torch tensor on the
  current (side) stream, asynchronously, and the next `run()` may overwrite that buffer: the reading
  thread therefore synchronizes that stream right after the copy (a host wait in the reading thread,
  never in the training thread), so the buffer is free before DALI is run again.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.backends.canvas import canvas_extent
from pipeline.backends.profile import timed
from pipeline.backends.source import ImageSource, RecordVerifier
from pipeline.views import DecodedBatch


def _build_pipeline(batch_size: int, canvas_size: int, threads: int, device: torch.device):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device.type == "cuda"

    @pipeline_def
    def canvas_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        sizes = fn.external_source(name="sizes", dtype=types.FLOAT, ndim=1)
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False)
        images = fn.resize(images, size=sizes, antialias=True, interp_type=types.INTERP_LINEAR)  # size: a CPU argument input
        return fn.pad(images, axes=(0, 1), shape=(canvas_size, canvas_size), fill_value=0)

    pipe = canvas_pipeline(
        batch_size=batch_size,
        num_threads=max(1, threads),
        device_id=(device.index or 0) if on_gpu else None,
        exec_pipelined=False,  # fed and run one batch at a time by the loader's prefetch thread
        exec_async=False,
        prefetch_queue_depth=1,
    )
    pipe.build()
    return pipe


class DaliCanvasDecoder:
    """`decode_batches(batches)` yields (DecodedBatch, [(index, reason)] skipped) per index array, in order."""

    def __init__(self, source: ImageSource, batch_size: int, canvas_size: int, threads: int, device: torch.device,
                 verify_crc: bool = True):
        self.source = source
        self.batch_size = batch_size
        self.canvas_size = canvas_size
        self.threads = threads
        self.device = torch.device(device)
        self.verifier = RecordVerifier(source, verify_crc, threads)
        self.timings: dict[str, float] | None = None  # bench --profile fills "read" / "verify" / "decode"
        self.pipe = _build_pipeline(batch_size, canvas_size, threads, self.device)

    def decode_batches(self, batches):
        for indices in batches:
            yield self.decode(np.asarray(indices, dtype=np.int64))

    def decode(self, indices: np.ndarray) -> tuple[DecodedBatch, list[tuple[int, str]]]:
        with timed(self.timings, "read"):
            encoded = [self.source.encoded(int(index)) for index in indices]
        with timed(self.timings, "verify"):
            reasons = self.verifier.reasons(indices, encoded)
        sizes, skipped, keep = [], [], []
        for position, (index, data, reason) in enumerate(zip(indices, encoded, reasons)):
            height_width = self._header_size(int(index), data) if reason is None else None
            if height_width is None:
                skipped.append((int(index), reason or "not a readable image header"))
                continue
            sizes.append(np.array(canvas_extent(*height_width, self.canvas_size), dtype=np.float32))
            keep.append(position)
        with timed(self.timings, "decode"):
            canvas, failures = self._run_checked([encoded[k] for k in keep], sizes)
        skipped += [(int(indices[keep[k]]), reason) for k, reason in failures.items()]
        good = [k for k in range(len(keep)) if k not in failures]
        keep = [keep[k] for k in good]
        extent = torch.tensor([[int(s) for s in sizes[k]] for k in good], dtype=torch.int64).reshape(-1, 2)
        batch = DecodedBatch(
            canvas=canvas,
            extent=extent.to(self.device),
            index=torch.as_tensor(indices[keep], dtype=torch.int64).to(self.device),
            label=torch.as_tensor(self.source.labels[indices[keep]], dtype=torch.int64).to(self.device),
        )
        return batch, skipped

    def _header_size(self, index: int, data: np.ndarray) -> tuple[int, int] | None:
        if len(data) < 4:
            return None
        if self.source.kind == "beton":
            return int(self.source.heights[index]), int(self.source.widths[index])
        try:
            width, height = Image.open(io.BytesIO(data.tobytes())).size
            return height, width
        except Exception:  # PIL raises several types for a bad header
            return None

    def _run_checked(self, encoded: list[np.ndarray], sizes: list[np.ndarray]) -> tuple[torch.Tensor, dict[int, str]]:
        """Run the batch -> (canvas of the good records, {position: reason} of the bad ones); when DALI
        fails, rebuild the pipeline and find the bad records one by one."""
        if not encoded:
            return torch.zeros(0, self.canvas_size, self.canvas_size, 3, dtype=torch.uint8, device=self.device), {}
        try:
            return self._run(encoded, sizes), {}
        except RuntimeError:
            self.pipe = _build_pipeline(self.batch_size, self.canvas_size, self.threads, self.device)
        failures = {}
        for k in range(len(encoded)):
            try:
                self._run([encoded[k]], [sizes[k]])
            except RuntimeError as error:
                failures[k] = f"DALI cannot decode it ({len(encoded[k])} bytes): {_first_line(error)}"
                self.pipe = _build_pipeline(self.batch_size, self.canvas_size, self.threads, self.device)
        good = [k for k in range(len(encoded)) if k not in failures]
        if not good:
            return self._run_checked([], [])[0], failures
        return self._run([encoded[k] for k in good], [sizes[k] for k in good]), failures

    def _run(self, encoded: list[np.ndarray], sizes: list[np.ndarray]) -> torch.Tensor:
        self.pipe.feed_input("encoded", encoded)
        self.pipe.feed_input("sizes", sizes)
        (output,) = self.pipe.run()
        return dali_to_torch(output, self.device)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "Error" in line or "error" in line] or lines or [type(error).__name__]
    return useful[0][:160]


def dali_to_torch(output, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor on `device` of the output's own dtype (a copy: DALI
    reuses its buffers). The decode graph gives uint8, the `dali-ops` baseline's normalize gives float32."""
    dense = output.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_type

        stream = torch.cuda.current_stream(device)
        result = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, result, cuda_stream=stream)
        # host wait, in the reading thread only: the copy out of DALI's buffer must be done before the
        # next run() can overwrite that buffer
        stream.synchronize()
        return result
    return torch.from_numpy(np.array(dense))
