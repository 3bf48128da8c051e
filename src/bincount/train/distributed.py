"""The process group, from the environment that torchrun or the PyTorchJob operator sets, and the rule that
keeps ranks from hanging on an error.

torchrun (also with `PET_*` settings and elastic rendezvous) and the operator without torchrun both hand a
worker MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK; torchrun adds LOCAL_RANK and LOCAL_WORLD_SIZE. A single
process with none of them runs without a process group.

The rule: code that can fail on bad input runs inside `with phase(dist):` and contains no collective. At the
end of the block every rank learns whether any rank failed; the lowest failing rank raises its own error, all
others a quiet `PeerError`, so the user reads one message and no rank waits forever in a collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from bincount.devices import pick_device
from bincount.errors import BincountError, ConfigError


class PeerError(BincountError):
    """This rank stopped because another one failed; that rank prints the reason."""

    silent = True


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def init(device: str = "auto", timeout_s: float = 1800) -> Dist:
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    dev = pick_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if world > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ConfigError(f"WORLD_SIZE is {world} but {' and '.join(missing)} not set; "
                              "start with torchrun or inside a PyTorchJob")
        tdist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                 timeout=timedelta(seconds=timeout_s))
    return Dist(rank, local_rank, world, local_world, dev)


def close(d: Dist) -> None:
    if d.world > 1 and tdist.is_initialized():
        tdist.destroy_process_group()


def agree(d: Dist, error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank brings an error."""
    if d.world == 1:
        if error is not None:
            raise error
        return
    first = torch.tensor([d.rank if error is not None else d.world], device=d.device)
    tdist.all_reduce(first, op=tdist.ReduceOp.MIN)
    failed = int(first.item())
    if failed == d.world:
        return
    if error is not None and failed == d.rank:
        raise error
    raise PeerError(f"rank {d.rank} stopped because rank {failed} failed")


def next_batch(d: Dist, batches: Iterator[Any]) -> Any | None:
    """Collective: the next batch of every rank's loader, or None on every rank once any loader runs dry (a
    streamed epoch that skipped a corrupt image), so that all take the same steps; a loader's error is raised as
    `agree` raises."""
    batch = error = None
    try:
        batch = next(batches)
    except StopIteration:
        pass
    except Exception as e:
        error = _worker_error(e)
    if d.world == 1:
        if error is not None:
            raise error
        return batch
    codes = torch.tensor([d.rank if error is not None else d.world, int(batch is not None)], device=d.device)
    tdist.all_reduce(codes, op=tdist.ReduceOp.MIN)
    failed, ready = codes.tolist()
    if failed != d.world:
        if error is not None and failed == d.rank:
            raise error
        raise PeerError(f"rank {d.rank} stopped because rank {failed} failed")
    return batch if ready else None


def _worker_error(e: Exception) -> Exception:
    """A DataLoader worker's BincountError arrives with the worker's traceback as its message: keep its last line,
    the message the user can act on."""
    text = str(e).rstrip()
    if isinstance(e, BincountError) and text.startswith("Caught "):
        return type(e)(text.splitlines()[-1].split(": ", 1)[-1])
    return e


@contextlib.contextmanager
def phase(d: Dist) -> Iterator[None]:
    error = None
    try:
        yield
    except Exception as e:
        error = e
    agree(d, error)


def all_gather(d: Dist, obj: Any) -> list[Any]:
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    if d.world > 1:
        tdist.all_reduce(values)
    return values


def sync_buffers(d: Dist, module: torch.nn.Module) -> None:
    """Rank 0's batch-norm statistics everywhere, so every rank validates and saves the same model."""
    if d.world > 1:
        for buffer in module.buffers():
            tdist.broadcast(buffer, src=0)
