import importlib
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from x2vlm.train.host_memory import reuse_freed_memory

reuse_freed_memory()  # as the command line does: the suite's training steps reuse freed memory

PARITY = Path(__file__).parent / "data" / "parity"
TINY_VOCAB = str(PARITY / "tiny_vocab.txt")  # the tiny model's WordPiece vocabulary


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "tiny_state_dict.safetensors"))


@pytest.fixture(scope="session")
def tiny_inputs() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "tiny_inputs.safetensors"))


@pytest.fixture(scope="session")
def tiny_outputs() -> dict[str, torch.Tensor]:
    return load_file(str(PARITY / "tiny_outputs.safetensors"))


@pytest.fixture(scope="session")
def tokenizer():
    """The tokenizer of the tiny vocabulary (``TINY_VOCAB``)."""
    from x2vlm.tokenizer import WordPieceTokenizer

    return WordPieceTokenizer(TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """The generated world of size "tiny", seed 0; shared by the test modules, so only read it."""
    from x2vlm.world import generate

    out = tmp_path_factory.mktemp("tiny_world") / "tiny"
    generate(out, size="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> Path:
    """A very small generated world (a custom size preset: a dozen training scenes), seed 0;
    shared by the test modules, so only read it."""
    generate = importlib.import_module("x2vlm.world.generate")
    out = tmp_path_factory.mktemp("micro_world") / "micro"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(generate.SIZE_PRESETS, "micro",
                   generate.SizePreset(generate._per_split(12, 6), generate._per_split(2, 1), generate._per_split(8, 6), 5, 4, 0.5, 1))
        generate.generate(out, size="micro", seed=0)
    return out


def tiny_finetune_config(task: str, data: dict, out_dir: Path, **changes):
    """A fine-tuning run config of the tiny preset (tiny vocabulary, random init, fp32, no
    tensorboard) for ``task`` with data section ``data``; ``changes`` sets further keys."""
    from x2vlm.train.finetune import build_finetune_config

    return build_finetune_config({
        "task": task, "model": "x2vlm-tiny", "model_changes": {"tokenizer": TINY_VOCAB}, "init": "scratch", "data": data,
        "out_dir": str(out_dir), "precision": "fp32", "tensorboard": False, **changes,
    }, f"tiny {task} config")


def build_tiny(task: str, tiny_state):
    from x2vlm.checkpoint import load_official
    from x2vlm.config import preset
    from x2vlm.models.x2vlm import X2VLM

    model = X2VLM(preset("x2vlm-tiny", task=task))
    new = load_official(model, tiny_state)
    assert new == []
    return model.eval()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: for tiny tensors thread hand-offs cost more than the work,
    badly so on a busy machine (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ThreadGather:
    """All-gather between threads that play the ranks of one process group (concatenation in rank order)."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list = [None] * world_size

    def for_rank(self, rank: int):
        def gather(local: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = local
            self.barrier.wait()
            out = torch.cat(self.slots)
            self.barrier.wait()  # everyone has read before the next round writes
            return out
        return gather

    def run(self, work) -> dict[int, object]:
        """``work(rank, gather)`` on one thread per rank; returns each rank's result. A failure on
        one rank releases the others and is raised here."""
        results: dict[int, object] = {}
        errors: list[BaseException] = []

        def run_rank(rank: int):
            try:
                results[rank] = work(rank, self.for_rank(rank))
            except Exception as err:  # noqa: BLE001 - any failure must release the other threads; raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=run_rank, args=(rank,)) for rank in range(len(self.slots))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def integer_row_gathers(tensor: torch.Tensor) -> int:
    """How many ``x[integer index]`` nodes ``tensor``'s autograd graph holds: their backward
    (``index_put_`` with accumulate) adds float32 rows with atomics from several CPU threads, in an
    order that changes from run to run when an index repeats. Boolean masks select each row at most
    once, so their backward is deterministic and they are not counted."""
    count, seen, stack = 0, set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "IndexBackward0":
            count += any(index is not None and index.dtype != torch.bool for index in node._saved_indices)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count
