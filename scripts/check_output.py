"""Check a merged folder: transformers loads it with no missing or unexpected keys, every tensor equals
the float64 reference rounded once, and the model generates. Usage: check_output.py SFT ALIGNED OUT"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's expo_dist
from expo_dist.testing.reference import assert_exact  # noqa: E402

sft, aligned, out = sys.argv[1:4]
manifest = json.load(open(os.path.join(out, "expo_manifest.json")))
model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
if bad:
    sys.exit(f"check: transformers reported {bad}")
tie = bool(json.load(open(os.path.join(out, "config.json"))).get("tie_word_embeddings", False))
n = assert_exact(out, sft, aligned, manifest["alpha"], tie)
tok = AutoTokenizer.from_pretrained(out)
ids = tok("the model", return_tensors="pt").input_ids
with torch.no_grad():
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
print(f"check: {out} loads in transformers ({sum(p.numel() for p in model.parameters())} parameters), "
      f"{n} elements equal the float64 reference, generated {gen.shape[1] - ids.shape[1]} tokens", file=sys.stderr)
