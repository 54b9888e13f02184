"""Build a small GLM-4-shaped model, save it in the Hugging Face layout, load it back, score text.

Runs offline in seconds. (Once the bundled Shakespeare models land, `glmkit generate` replaces this.)
"""

import tempfile

import torch

from glmkit import AutoModelForCausalLM, GlmConfig, GlmForCausalLM

config = GlmConfig(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, pad_token_id=0,
)  # fmt: skip
torch.manual_seed(0)
with tempfile.TemporaryDirectory() as path:
    GlmForCausalLM(config).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map="auto")
    input_ids = torch.randint(1, 512, (2, 16), device=model.device)
    mask = torch.ones_like(input_ids)
    out = model(input_ids, attention_mask=mask, labels=input_ids)
    print(f"{type(model).__name__}: {model.num_parameters():,} parameters on {model.device}, {model.dtype}")
    uniform = torch.log(torch.tensor(512.0)).item()
    print(f"logits {tuple(out.logits.shape)}, loss {out.loss.item():.3f} (uniform would be {uniform:.3f})")
    print(f"cache holds {out.past_key_values.get_seq_length()} positions")
