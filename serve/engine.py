"""The generation engine: one model (merged, or a base with an adapter cache) and a batched decode loop.

The loop is ours rather than `model.generate` because each row of a batch carries its own sampling
settings (temperature, top_p, seed, stop strings, max_tokens) and its own adapter, and because a server
wants every new token as it is made (streaming, time to first token). Rows are left-padded; positions
come from the attention mask so a padded row computes exactly what it would alone. Finished rows leave
the batch (their KV cache rows are dropped) so long answers do not make short ones pay.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from .adapters import AdapterCache, find_adapters

PROBE_PROMPTS = [
    "How do I reset my password?",
    "<|im_start|>user\nWhat are your opening hours?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nCan I change my delivery address?<|im_end|>\n<|im_start|>assistant\n",
    "Summarise the refund policy in one sentence.",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "Write a haiku about the sea.",
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
]


CONTEXT_TOKENS = 5  # tokens decoded before the new ones, so a word boundary decodes as in the full text


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    adapter: Optional[str] = None  # None: the model itself (merged model or bare base)
    cancel: Optional[threading.Event] = None  # set when the client went away: the row leaves the batch


@dataclass
class StepOutput:
    text: str  # text produced since the previous step ('' while a possible stop string is held back)
    completion_tokens: int
    finish_reason: Optional[str] = None  # "stop" | "length" once the row is done


class _Row:
    """Decoding state of one request: its tokens, what text was sent, and when it ends."""

    def __init__(self, req: GenRequest, tokenizer, eos_ids: set[int], default_seed: int):
        import torch

        self.req = req
        self.tok = tokenizer
        self.eos_ids = eos_ids
        # Incremental detokenization (as vLLM's): only the tokens since the last emitted text are decoded, after a
        # few tokens of context (the prompt's tail at first) so that word boundaries decode as in the full text.
        self.ctx = list(req.prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ctx)
        self.text = ""
        self.ids: list[int] = []
        self.sent = 0
        self.done = False
        self.gen = torch.Generator().manual_seed(req.seed if req.seed is not None else
                                                 (default_seed * 1_000_003 + time.perf_counter_ns()) % (2**63))

    def _detokenize(self, token: int) -> str:
        """The text of the output so far, decoding only the newest tokens; an unfinished UTF-8 sequence waits."""
        self.ctx.append(token)
        before = self.tok.decode(self.ctx[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = self.tok.decode(self.ctx[self.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ctx)
        return self.text

    def _flush(self) -> str:
        """The text including a held-back tail (the answer ends here, finished or not)."""
        tail = self.tok.decode(self.ctx[self.read_offset:], skip_special_tokens=True) if \
            self.read_offset < len(self.ctx) else ""
        before = self.tok.decode(self.ctx[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = self.tok.decode(self.ctx[self.prefix_offset:], skip_special_tokens=True)
        return self.text + (after[len(before):] if len(after) > len(before) else tail)

    def add(self, token: int) -> StepOutput:
        if token in self.eos_ids:
            self.done = True
            text = self._flush()
            return StepOutput(text[self.sent:], len(self.ids) + 1, "stop")
        self.ids.append(token)
        text = self._detokenize(token)
        for s in self.req.stop:
            k = text.find(s, max(0, self.sent - len(s)))
            if k >= 0:
                self.done = True
                return StepOutput(text[self.sent:k], len(self.ids), "stop")
        if len(self.ids) >= self.req.max_tokens:
            self.done = True
            text = self._flush()
            return StepOutput(text[self.sent:], len(self.ids), "length")
        safe = len(text)  # an unfinished UTF-8 sequence is not in `text` yet
        for s in self.req.stop:  # hold back a tail that may grow into a stop string
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    safe = min(safe, len(text) - n)
                    break
        safe = max(safe, self.sent)
        out = StepOutput(text[self.sent:safe], len(self.ids))
        self.sent = safe
        return out


def sample_next(logits, rows: list[_Row]):
    """One token per row: greedy at temperature 0, otherwise temperature + nucleus sampling with the row's seed."""
    import torch

    out = torch.empty(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        r = row.req
        if r.temperature == 0:
            out[i] = int(torch.argmax(logits[i]))
            continue
        # In float64 and shifted by the max: the same distribution, but a tiny temperature (5e-324 is 0 in float32)
        # gives 0 for the top logit and -inf for the rest instead of nan, i.e. greedy, as its limit is.
        scaled = (logits[i].double() - logits[i].max().double()) / r.temperature
        probs = torch.softmax(scaled, dim=-1).float()
        if r.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sp, 0) - sp) < r.top_p  # the smallest prefix whose mass reaches top_p
            keep[0] = True  # the top token always (a top_p below float32's range compares as 0)
            sp = sp * keep
            out[i] = si[torch.multinomial(sp / sp.sum(), 1, generator=row.gen)]
        else:
            out[i] = torch.multinomial(probs, 1, generator=row.gen)[0]
    return out


def load_model(path: str, quantization: str = "none", log: Callable[[str], None] = print, security=None):
    """A causal LM in fp32 on CPU (safetensors only unless security.allow_pickle_weights, no remote code),
    optionally int8-quantized (CPU), or loaded in 8-bit / 4-bit with bitsandbytes on the GPU. An exported folder is
    checked against its manifest and decrypted if encrypted."""
    from rayft.models.config import ModelConfig
    from rayft.models.load import load_base_model
    from rayft.security.artifacts import opened_for_load

    bnb = BNB_MODES.get(quantization)  # bitsandbytes on a CUDA GPU: weights quantized as they load
    with opened_for_load(path, security) as local:
        model = load_base_model(ModelConfig(name_or_path=local, quantization=bnb or "none"),
                                gpu_dtype() if bnb else "float32", device_map={"": 0} if bnb else None,
                                allow_pickle=bool(security and security.allow_pickle_weights)).eval()
    if quantization == "int8":
        model = quantize_int8(model)
    return model


BNB_MODES = {"bnb-int8": "8bit", "bnb-nf4": "4bit"}  # serve.quantization -> train's ModelConfig.quantization
QUANT_LABELS = {"int8": "int8 dynamic quantization", "bnb-int8": "bitsandbytes 8-bit (LLM.int8) quantization",
                "bnb-nf4": "bitsandbytes 4-bit (NF4) quantization"}


def to_gpu(model, device: str, log: Callable[[str], None] = print):
    """The model on the replica's GPU in bfloat16 (float16 where bfloat16 is missing): a replica that reserved a GPU
    decodes on it. int8 dynamic quantization is a CPU mode and stays there."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"serve.num_gpus_per_replica asks for a GPU but torch sees no CUDA device "
                           f"(torch.cuda.is_available() is false; torch {torch.__version__}); install a CUDA build "
                           f"of torch on the GPU nodes, or set num_gpus_per_replica: 0")
    if any(getattr(m, "_packed_params", None) is not None for m in model.modules()):
        return model  # int8 dynamic quantization: CPU kernels only
    dtype = getattr(torch, gpu_dtype())
    log(f"model on {device} in {dtype}")
    return model.to(device=device, dtype=dtype)


def gpu_dtype() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def check_gpu_quantization(quantization: str) -> None:
    """Refuse a bitsandbytes mode where it cannot run, before anything is loaded: the field, the value, the fix."""
    why = None
    try:
        import torch

        if not torch.cuda.is_available():
            why = "no CUDA GPU is visible to this process (torch.cuda.is_available() is false)"
    except ImportError:  # pragma: no cover
        why = "torch is missing"
    if why is None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            why = "the bitsandbytes package is not installed (pip install 'rayft[gpu]')"
    if why:
        raise RuntimeError(
            f"serve.quantization: {quantization!r} loads the model with bitsandbytes on a CUDA GPU, and {why}. On CPU "
            f"use serve.quantization: int8 (dynamic int8 quantization, with the same start-up agreement check) or none")


def quantize_int8(model):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False).eval()


class Engine:
    """Generates for a batch of requests; one per served model version inside a replica."""

    def __init__(self, model_path: str, adapters: Optional[dict[str, str]] = None, adapters_dir: Optional[str] = None,
                 adapter_cache_size: int = 4, mixed_adapter_batches: bool = True, quantization: str = "none",
                 min_agreement: float = 0.8, resolve: Callable[[str], str] = lambda p: p,
                 log: Callable[[str], None] = print, on_cache_event=None, seed: int = 0, security=None,
                 device: str = "cpu"):
        from transformers import AutoTokenizer

        from rayft.security.artifacts import opened_for_load

        self.model_path = model_path
        if quantization in BNB_MODES:
            check_gpu_quantization(quantization)
        # One opening for tokenizer and weights: the manifest is checked, an encrypted export is decrypted into a
        # private temporary folder, and that folder is gone once both are in memory.
        with opened_for_load(model_path, security) as local:
            self.tokenizer = AutoTokenizer.from_pretrained(local)
            base = load_model(local, "none", security=security)
            self.agreement: Optional[float] = None
            if quantization != "none":
                # Full-precision answers first (on the GPU in half precision for bitsandbytes), then the quantized
                # model; the full-precision copy is dropped before the quantized one loads.
                if quantization in BNB_MODES:
                    import torch

                    reference = probe_answers(base.to("cuda", dtype=getattr(torch, gpu_dtype())), self.tokenizer)
                    del base
                    torch.cuda.empty_cache()
                    base = load_model(local, quantization, security=security)
                else:
                    reference = probe_answers(base, self.tokenizer)
                    base = quantize_int8(base)
                answers = probe_answers(base, self.tokenizer)
                self.agreement = sum(a == b for a, b in zip(reference, answers)) / len(PROBE_PROMPTS)
                label = QUANT_LABELS[quantization]
                log(f"{label}: greedy answers agree with full precision on {self.agreement:.0%} of "
                    f"{len(PROBE_PROMPTS)} probe prompts (required {min_agreement:.0%})")
                if self.agreement < min_agreement:
                    raise RuntimeError(
                        f"serve.quantization: {quantization} answers agree with full precision on only "
                        f"{self.agreement:.0%} of the probe prompts (< serve.quantization_min_agreement "
                        f"{min_agreement:.0%}); serve with quantization: none or lower the threshold")
        if device.startswith("cuda") and quantization not in BNB_MODES:
            base = to_gpu(base, device, log)  # before the adapter cache: its LoRA slots follow the base's weights
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.seed = seed
        self.mixed = mixed_adapter_batches
        self.model = base
        self.device = next(base.parameters()).device
        gc = getattr(base, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None) if gc is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.context_length = int(getattr(base.config, "max_position_embeddings", 2048))
        catalogue = find_adapters(adapters or {}, adapters_dir)
        self.cache = AdapterCache(base, catalogue, adapter_cache_size, resolve=resolve, on_event=on_cache_event,
                                  security=security) \
            if catalogue else None

    # -- batching ------------------------------------------------------------------------------------------
    def plan(self, reqs: list[GenRequest]) -> list[list[int]]:
        """Split a batch into groups decoded together: all rows at once when the adapters fit the cache
        (mixed batch), else chunks of at most `capacity` adapters; one group per adapter when mixing is off."""
        if self.cache is None:
            return [list(range(len(reqs)))]
        if not self.mixed:
            groups: dict = {}
            for i, r in enumerate(reqs):
                groups.setdefault(r.adapter, []).append(i)
            return list(groups.values())
        chunks: list[list[int]] = []
        current: list[int] = []
        names: set = set()
        for i, r in enumerate(reqs):
            if r.adapter is not None and r.adapter not in names and len(names) == self.cache.capacity:
                chunks.append(current)
                current, names = [], set()
            current.append(i)
            if r.adapter is not None:
                names.add(r.adapter)
        if current:
            chunks.append(current)
        return chunks

    def generate(self, reqs: list[GenRequest]) -> Iterator[list[Optional[StepOutput]]]:
        """Yields, per decode step, one entry per request: its new output, or None when it has nothing new."""
        for group in self.plan(reqs):
            for outs in self._decode([reqs[i] for i in group]):
                full: list[Optional[StepOutput]] = [None] * len(reqs)
                for j, o in zip(group, outs):
                    full[j] = o
                yield full

    def _decode(self, reqs: list[GenRequest]) -> Iterator[list[Optional[StepOutput]]]:
        import torch
        from transformers import DynamicCache

        slots = None  # per row: the adapter slot (0: no adapter), while this batch is in the forward pass
        if self.cache is not None:
            used = [r.adapter for r in reqs if r.adapter is not None]
            if used:
                self.cache.ensure(used)
                slots = torch.tensor([self.cache.slot(r.adapter) for r in reqs], dtype=torch.long, device=self.device)
        rows = [_Row(r, self.tokenizer, self.eos_ids, self.seed) for r in reqs]
        B = len(reqs)
        L = max(len(r.prompt_ids) for r in reqs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((B, L), pad, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, r in enumerate(reqs):
            n = len(r.prompt_ids)
            input_ids[i, L - n:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[i, L - n:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        input_ids, attn, pos = input_ids.to(self.device), attn.to(self.device), pos.to(self.device)
        with torch.no_grad():  # per call: a generator must not leave grad mode changed between its steps
            out = self._forward(slots, input_ids=input_ids, attention_mask=attn, position_ids=pos,
                                past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].float().cpu()
        next_pos = pos[:, -1] + 1
        active = list(range(B))
        for _ in range(max(r.max_tokens for r in reqs) + 1):
            toks = sample_next(logits, [rows[i] for i in active])
            outs: list[Optional[StepOutput]] = [None] * B
            for j, i in enumerate(active):
                outs[i] = rows[i].add(int(toks[j]))
            yield outs
            for i in active:
                if rows[i].req.cancel is not None and rows[i].req.cancel.is_set():
                    rows[i].done = True
            keep = [j for j, i in enumerate(active) if not rows[active[j]].done]
            if not keep:
                return
            toks = toks.to(self.device)
            if len(keep) < len(active):
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                with torch.no_grad():
                    cache.batch_select_indices(idx)
                attn, next_pos, toks = attn[idx], next_pos[idx], toks[idx]
                active = [active[j] for j in keep]
                if slots is not None:
                    slots = slots[idx]
            attn = torch.cat([attn, torch.ones((len(active), 1), dtype=torch.long, device=self.device)], dim=1)
            with torch.no_grad():
                out = self._forward(slots, input_ids=toks[:, None], attention_mask=attn,
                                    position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :].float().cpu()
            next_pos = next_pos + 1

    def _forward(self, slots, **inputs):
        """One forward pass of the model; with adapters, each row through its own adapter slot."""
        if self.cache is None:
            return self.model(**inputs)
        self.cache.state.rows = slots if slots is not None and bool((slots > 0).any()) else None
        try:
            return self.model(**inputs)
        finally:
            self.cache.state.rows = None

    def generate_text(self, reqs: list[GenRequest]) -> list[tuple[str, int, str]]:
        """Run to the end: (text, completion tokens, finish reason) per request."""
        texts = [""] * len(reqs)
        final: list = [None] * len(reqs)
        for outs in self.generate(reqs):
            for i, o in enumerate(outs):
                if o is not None:
                    texts[i] += o.text
                    if o.finish_reason:
                        final[i] = (o.completion_tokens, o.finish_reason)
        return [(t, f[0], f[1]) for t, f in zip(texts, final)]


def probe_answers(model, tokenizer, max_tokens: int = 16) -> list[list[int]]:
    """The greedy continuation (max_tokens) of each of PROBE_PROMPTS under `model`."""
    import torch

    device = next(model.parameters()).device
    answers = []
    for text in PROBE_PROMPTS:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(out[0, ids.shape[1]:].tolist())
    return answers


def set_threads(n: Optional[int]) -> None:
    import torch

    if n:
        torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = str(n)
