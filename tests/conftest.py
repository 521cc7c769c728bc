"""Test environment: set before anything imports triton, deepspeed or transformers.

TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (must precede the @triton.jit decorators);
DS_ACCELERATOR=cpu selects DeepSpeed's CPU accelerator (gloo); HF_HUB_OFFLINE=1 forbids any
model or tokenizer download (tiny models are built from configs in code).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
