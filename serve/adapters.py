"""The per-replica adapter cache: LoRA adapters loaded on demand into slots of one base model, least recently used out.

The base model's linear layers are wrapped once (serve/batched_lora.py); each loaded adapter owns a slot, and
rows for different adapters share one forward pass (one gather + two bmm per layer). The cache only changes
between batches: a batch pins the adapters it uses. There are `capacity + 1` adapter slots so a new adapter is
read, checked and written before the least recently used one is cleared: a load that fails evicts nothing.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

from rayft.security.artifacts import opened_for_load

from .batched_lora import read_adapter, wrap_linears


class UnknownAdapter(KeyError):
    pass


class AdapterLoadError(RuntimeError):
    """An adapter in the catalogue that cannot be loaded (a server-side problem: 500, naming the adapter)."""


def find_adapters(adapters: dict[str, str], adapters_dir: Optional[str]) -> dict[str, str]:
    """The adapter catalogue: configured names plus every subfolder of adapters_dir with an adapter_config.json."""
    found: dict[str, str] = {}
    if adapters_dir:
        if not os.path.isdir(adapters_dir):
            raise FileNotFoundError(f"serve.adapters_dir: {adapters_dir!r} is not a folder; create it or unset it")
        for entry in sorted(os.listdir(adapters_dir)):
            path = os.path.join(adapters_dir, entry)
            if any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_config.json", "adapter_config.json.enc")):
                found[entry] = path
    found.update(adapters)
    return found


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0
    load_time_s_total: float = 0.0
    last_load_s: float = 0.0
    events: list = field(default_factory=list)  # recent ("load"|"evict", name), for tests and debugging

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("hits", "misses", "evictions", "loads", "load_time_s_total", "last_load_s")}
        d["events"] = list(self.events[-50:])
        return d


class AdapterCache:
    """Adapters by name -> slot of the wrapped base model; slot 0 is the base model itself (no adapter)."""

    def __init__(self, base_model, catalogue: dict[str, str], capacity: int,
                 resolve: Callable[[str], str] = lambda p: p, on_event: Optional[Callable[[str, str, float], None]] = None,
                 security=None):
        self.catalogue = dict(catalogue)
        self.security = security  # train.security.SecurityConfig: manifest check, decryption, no pickle files
        self.capacity = capacity
        self.resolve = resolve
        self.on_event = on_event or (lambda kind, name, seconds: None)
        self.state, self.layers = wrap_linears(base_model, capacity + 2)
        self.model = base_model
        self.loaded: "OrderedDict[str, int]" = OrderedDict()  # name -> slot, least recently used first
        self.free = list(range(1, capacity + 2))
        self.stats = CacheStats()

    def check(self, name: str) -> None:
        if name not in self.catalogue:
            raise UnknownAdapter(name)

    def slot(self, name: Optional[str]) -> int:
        return 0 if name is None else self.loaded[name]

    def ensure(self, names: list[str]) -> None:
        """Make every adapter in `names` loaded (at most `capacity` distinct names)."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.capacity:
            raise ValueError(f"{len(wanted)} adapters in one batch > adapter_cache_size {self.capacity}")
        for name in wanted:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                self.stats.hits += 1
                self.on_event("hit", name, 0.0)
                continue
            self.check(name)
            self.stats.misses += 1
            self.on_event("miss", name, 0.0)
            self._load(name)
            while len(self.loaded) > self.capacity:
                victim = next(n for n in self.loaded if n not in wanted)
                self._evict(victim)

    def _load(self, name: str) -> None:
        t0 = time.perf_counter()
        try:
            path = self.resolve(self.catalogue[name])
            with opened_for_load(path, self.security) as local:
                weights = read_adapter(name, local, self.layers)
        except Exception as e:  # noqa: BLE001 - any loader error becomes one that names the adapter
            raise AdapterLoadError(
                f"adapter {name!r} ({self.catalogue[name]}) could not be loaded: {type(e).__name__}: {e}. Check that "
                f"it is a PEFT LoRA adapter trained on this base model") from e
        slot = self.free.pop(0)
        for module, (a, b) in weights.modules.items():  # layers no adapter targets keep rank 0 (and skip LoRA)
            self.layers[module].set_rank(a.shape[0])
            self.layers[module].fill(slot, a, b)
        dt = time.perf_counter() - t0
        self.loaded[name] = slot
        self.stats.loads += 1
        self.stats.load_time_s_total += dt
        self.stats.last_load_s = dt
        self.stats.events.append(("load", name))
        self.on_event("load", name, dt)

    def _evict(self, name: str) -> None:
        slot = self.loaded.pop(name)
        for layer in self.layers.values():
            layer.clear(slot)
        self.free.append(slot)
        self.stats.evictions += 1
        self.stats.events.append(("evict", name))
        self.on_event("evict", name, 0.0)
