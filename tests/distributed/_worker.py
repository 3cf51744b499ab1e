"""One spawned process of tests/distributed/test_distributed.py: `_worker.py TASK OUT ARGS...`
with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set by the test.

    ep CKPT DTYPE QUANT  expert-parallel forward cases (QUANT '' or int8) (_cases.forward_cases); rank 0 saves them
    corpus           the corpus analyses, corpus parallel (_cases.corpus_results); rank 0 saves
    die              rank 1 exits at once; the others run a collective and must fail cleanly
"""
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # noqa: E402

import moe_engine  # noqa: E402
from moe_engine import distributed  # noqa: E402


def main(task: str, out: str, *args: str) -> int:
    try:
        if task == "ep":
            ckpt, dtype, quant = args
            model = moe_engine.load(ckpt, dtype=dtype, expert_parallel=True, progress=False,
                                    quant=quant or None)
            res = _cases.forward_cases(model)
        elif task == "corpus":
            distributed.init("cpu")
            res = _cases.corpus_results(moe_engine.load(progress=False, dtype="float32"))
        elif task == "die":
            distributed.init("cpu")
            if distributed.rank() == 1:
                os._exit(3)
            distributed.sum_int(1)
            return 0
        else:
            raise ValueError(f"unknown task {task!r}")
        if distributed.is_main():
            torch.save(res, out)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
