"""Stream a cache's targets to a trainer or evaluator: `TargetStream`, one rank's micro-batches in the global order
(`pipeline.targets.order`), converted to the trainer's form by `training_batch`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.targets.encoding import ENCODINGS, TensorSpec, unpack_indices
from pipeline.targets.layout import requested_tensors
from pipeline.targets.logits import sample_batch
from pipeline.targets.manifest import MANIFEST_NAME, CacheError, Manifest
from pipeline.targets.needs import TargetNeeds
from pipeline.targets.order import SampleOrder, micro_step_start
from pipeline.targets.rows import ROWS_TENSOR, stored_row_count
from pipeline.targets.store import ShardReader, open_cache

Item = TypeVar("Item")


def _prefetched(items: Iterator[Item], depth: int = 1) -> Iterator[Item]:
    """Yield from `items`, producing the next one in a daemon thread while the caller consumes the current one.

    An exception in the thread is re-raised here; closing this generator stops and joins the thread.
    """
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                ready.put(("item", item))
                if stop.is_set():
                    return
            ready.put(("end", None))
        except BaseException as error:
            ready.put(("error", error))

    thread = threading.Thread(target=produce, name="target-stream-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        # Free a slot: the producer makes at most one more put before it sees `stop`.
        while not ready.empty():
            ready.get_nowait()
        thread.join()


def training_batch(
    raw: dict[str, torch.Tensor], positions: torch.Tensor, needs: TargetNeeds, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """Shard tensors of a batch (on-disk names and dtypes) → the batch the trainer consumes: the sample tensors
    (`logits.sample_batch`: 8-bit codes and packed ids decoded), `attn_rows` [B, R] (the stored query rows, when the
    cache stores a fraction of them) and `maps`: each map the needs read, as its encoding's target (`DenseTarget`: the
    packed triangle; `SparseTarget`: tail sums at the map's temperature, at the stored rows). The online source builds
    its batches here too, so both feed the trainer the same form."""
    batch = sample_batch(raw, positions, needs.kd_temperature, fingerprint)
    rows = None
    if ROWS_TENSOR in raw:
        seq_len = fingerprint["seq_len"]
        count = stored_row_count(seq_len, fingerprint["attn_row_fraction"])
        rows = unpack_indices(raw[ROWS_TENSOR], seq_len, (len(raw[ROWS_TENSOR]), count))
        batch[ROWS_TENSOR] = rows
    encoding = ENCODINGS[fingerprint["encoding"]]
    batch["maps"] = {
        name: encoding.target(raw, name, temperature, fingerprint, rows) for name, temperature in needs.reads()
    }
    return batch


class TargetStream(IterableDataset[dict[str, Any]]):
    """Micro-batches of cached teacher targets for one rank, in the global order of `pipeline.targets.order`.

    Use with `DataLoader(stream, batch_size=None, num_workers=K)`: each worker takes every K-th micro-step, so the
    loader's round-robin yields the same sequence for any K. Each batch (B samples, T = seq_len) holds:
    `sample_ids` int64 [B], `positions` int64 [B] (global positions), `input_ids` int64 [B, T], `labels` int64 [B, T]
    (next token, -100 at the last position), `topk_values` float32 [B, T, k] (teacher log-probs), `topk_indices`
    int64 [B, T, k], `topk_tail` float32 [B, T] (tail sums at `needs.kd_temperature`), `loss_mask` bool [B, T] (the
    trained positions: all of text data, those predicting a reply token of chat data; `labels` are -100 elsewhere),
    and `maps`: each map the needs
    read by name → `DenseTarget` (float32 [B, H, T(T+1)/2], unpacked block by block by the loss on the consumer's
    device) or `SparseTarget` (tail sums at the map's temperature). See `training_batch`.

    `num_batches` bounds this rank's micro-steps (None: endless over epochs). `one_pass` stops once every sample from
    `start_position` on was served once; the last batches may then be short, and a rank with nothing left yields
    nothing. `manifest`: the cache already opened (and checked against the run) by a `TargetSource`; without it the
    cache is opened here and checked against `provenance` and `needs`. Each shard is checksummed the first time this
    process opens it unless `verify_checksums=False`, and the values of the tensors it reads are checked then
    whatever that flag (`store.check_shard_targets`).
    """

    def __init__(
        self,
        *,
        directory: Path | str,
        needs: TargetNeeds,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_position: int = 0,
        num_batches: int | None = None,
        one_pass: bool = False,
        manifest: Manifest | None = None,
        provenance: dict[str, Any] | None = None,
        verify_checksums: bool = True,
        prefetch: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected an integer ≥ 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 ≤ rank < world_size")
        if start_position < 0:
            raise ValueError(f"start_position={start_position}: expected a position ≥ 0")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches={num_batches}: expected None or an integer ≥ 0")
        self.directory = Path(directory)
        self.manifest = manifest if manifest is not None else open_cache(self.directory, provenance, needs)
        if self.manifest.num_samples == 0:
            raise CacheError(f"{self.directory / MANIFEST_NAME}: the cache holds no samples")
        self.needs = needs
        self.tensor_names = list(self.tensor_specs(0))
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_position = start_position
        self.num_batches = num_batches
        self.one_pass = one_pass
        self.verify_checksums = verify_checksums
        self.prefetch = prefetch
        self.encoding: str = self.manifest.fingerprint["encoding"]
        self.seq_len: int = self.manifest.fingerprint["seq_len"]

    def tensor_specs(self, num_rows: int) -> dict[str, TensorSpec]:
        """Spec of every tensor this stream reads from a shard of `num_rows` samples; no other tensor is touched."""
        return requested_tensors(self.manifest.fingerprint, self.needs, num_rows)

    @property
    def samples_per_epoch(self) -> int:
        """Samples in the cache: one epoch of positions."""
        return self.manifest.num_samples

    def _num_steps(self) -> int | None:
        """Micro-steps this rank yields in all (None: endless)."""
        limits = [] if self.num_batches is None else [self.num_batches]
        if self.one_pass:
            ahead = self.samples_per_epoch - self.rank * self.batch_size
            limits.append(max(0, -(-ahead // (self.world_size * self.batch_size))))
        return min(limits) if limits else None

    def __len__(self) -> int:
        """Micro-batches this rank yields; only finite streams (`num_batches` or `one_pass`) have a length."""
        steps = self._num_steps()
        if steps is None:
            raise TypeError("an endless TargetStream has no length; set num_batches")
        return steps

    def _step_ranges(self, worker: int, num_workers: int) -> Iterator[tuple[int, int]]:
        """[first, stop) positions of this rank's micro-steps k ≡ worker (mod num_workers)."""
        steps = self._num_steps()
        end = self.start_position + self.samples_per_epoch if self.one_pass else None
        step = worker
        while steps is None or step < steps:
            first = micro_step_start(self.start_position, step, self.rank, self.world_size, self.batch_size)
            stop = first + self.batch_size if end is None else min(first + self.batch_size, end)
            yield first, stop
            step += num_workers

    def _load(self, order: SampleOrder, reader: ShardReader, first: int, stop: int) -> dict[str, Any]:
        """The batch of positions [first, stop), which may cross a shard or an epoch boundary."""
        located = [order.locate(position) for position in range(first, stop)]
        slots_by_shard: dict[int, list[int]] = {}
        for slot, (shard, _) in enumerate(located):
            slots_by_shard.setdefault(shard, []).append(slot)
        parts = [
            reader.read(shard, [located[slot][1] for slot in slots], self.tensor_names)
            for shard, slots in slots_by_shard.items()
        ]
        # Parts come grouped by shard; `restore` puts every row back at its batch slot.
        grouped_slots = torch.tensor([slot for slots in slots_by_shard.values() for slot in slots])
        restore = torch.empty_like(grouped_slots)
        restore[grouped_slots] = torch.arange(len(grouped_slots))
        raw = {name: torch.cat([part[name] for part in parts])[restore] for name in self.tensor_names}
        return training_batch(raw, torch.arange(first, stop), self.needs, self.manifest.fingerprint)

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        order = SampleOrder([entry.num_samples for entry in self.manifest.shards], self.seed, self.shuffle)
        reader = ShardReader(self.directory, self.manifest, self.tensor_specs, self.verify_checksums)
        for first, stop in self._step_ranges(worker, num_workers):
            yield self._load(order, reader, first, stop)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._batches(worker, num_workers)
        return _prefetched(batches) if self.prefetch else batches
