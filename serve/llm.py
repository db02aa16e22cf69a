"""The vllm engine: one Ray Serve LLM deployment (vLLM) per served version, configured from the `serve:` section.

vLLM brings continuous batching, the paged KV cache, prefix caching, chunked prefill, tensor parallelism, multi-LoRA
and the OpenAI request features (`n`, `logprobs`, JSON mode, tools). rayft adds two things inside the replica, both
before vLLM reads a file:

- the model source: a folder, a hub id, `models:/NAME@alias`, `models:/NAME/VERSION` or `runs:/...` is resolved and
  pinned to a version in the replica (serve/sources.py), checked against its manifest and, when encrypted, decrypted
  into the replica's private folder;
- the adapters: `<model>:<adapter>` names one of rayft's catalogue (local folder, registry URI, storage URI), loaded on
  demand through Ray Serve's multiplexing with the same checks.

The private folder (mode 0700) lives as long as the replica and is removed when it stops. Ray Serve LLM builds
LLMServer from a class it is given (`build_llm_deployment(deployment_cls=...)`); `RayftLLMServer` subclasses it only to
resolve the model before the engine starts and to hand it rayft's adapter loader: everything else is Ray's.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from typing import Any, Optional

from .config import ServeConfig, ServeStartError

CPU_DTYPE_ENV = "RAYFT_VLLM_CPU_DTYPE"
CPU_PRELOAD_ENV = "RAYFT_VLLM_CPU_PRELOAD"


def engine_kwargs(cfg: ServeConfig, with_lora: bool) -> dict[str, Any]:
    """vLLM engine arguments: rayft's fields first, then `serve.engine_kwargs` as given (they win)."""
    on_gpu = cfg.num_gpus_per_replica > 0
    out: dict[str, Any] = {
        "dtype": cfg.dtype if cfg.dtype != "auto" else ("auto" if on_gpu else cpu_dtype()),
        # max_batch_size left at its hf default (8) would starve vLLM's continuous batching
        "max_num_seqs": cfg.max_batch_size if cfg.max_batch_size != 8 else 32,
        "enforce_eager": not on_gpu,  # on CPU, torch.compile costs minutes at start for little gain on small models
        "trust_remote_code": False,
    }
    if cfg.max_model_len:
        out["max_model_len"] = cfg.max_model_len
    if with_lora:
        out.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=cfg.adapter_cache_size)
    if on_gpu and cfg.num_gpus_per_replica > 1:
        out["tensor_parallel_size"] = int(cfg.num_gpus_per_replica)
    # vLLM's frontend arguments (Ray Serve LLM hands them to vLLM's OpenAI serving layer). tool_choice "none" leaves
    # the tools out of the prompt, as on the hf engine.
    out["exclude_tools_when_tool_choice_none"] = True
    if cfg.tool_call_parser:
        out.update(enable_auto_tool_choice=True, tool_call_parser=cfg.tool_call_parser)
    out.update(cfg.engine_kwargs)
    return out


def cpu_dtype() -> str:
    """float32 on CPUs. In bfloat16 on a CPU with AMX, vLLM 0.29 picks its AMX attention kernel
    (`cpu_attention_with_kv_cache`, isa "amx"), which kills the engine's worker with SIGILL on models with few
    attention heads, and every request of the replica with it: reproduced in an offline `vllm.LLM` (no Ray), on the
    first prompt, with 2 and 4 query heads of 64 (the tiny models at width 128 and 256); 8 heads (width 512) served.
    `serve.dtype: bfloat16` opts in where the model has been checked."""
    return os.environ.get(CPU_DTYPE_ENV) or "float32"


def cpu_preload() -> str:
    """LD_PRELOAD for a CPU engine replica: Intel OpenMP (libiomp5.so of the intel-openmp package, which vLLM's CPU
    build installs), as vLLM's CPU guide advises. Measured in consecutive runs of benchmarks/serve_load.py (32 streams):
    251 output tokens/s without it, 429 and 439 with it. RAYFT_VLLM_CPU_PRELOAD where `rayft serve` runs replaces it (a
    colon-separated list, for example with tcmalloc added; empty: preload nothing)."""
    if CPU_PRELOAD_ENV in os.environ:
        return os.environ[CPU_PRELOAD_ENV]
    try:
        from importlib.metadata import PackageNotFoundError, files

        found = [f for f in files("intel-openmp") or () if f.name == "libiomp5.so"]
    except (PackageNotFoundError, ImportError):
        return ""
    path = str(found[0].locate().resolve()) if found else ""
    return path if path and os.path.isfile(path) else ""


def check_engine_kwargs(kwargs: dict) -> None:
    """Every key must be a vLLM engine or frontend argument: a typo is an error naming it, before anything starts."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | {f.name for f in dataclasses.fields(FrontendArgs)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise ServeStartError(f"serve.engine_kwargs: {', '.join(hints)} is not a vLLM engine argument; see `vllm serve "
                         f"--help` for the names (snake_case), or remove it")


def check_tool_call_parser(name: Optional[str]) -> None:
    """serve.tool_call_parser must name one of vLLM's tool-call parsers: a typo is an error listing them, before the
    replicas start (vLLM would fail each one)."""
    if not name:
        return
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, 1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ServeStartError(f"serve.tool_call_parser: {name!r} is not one of vLLM's tool-call parsers; {hint}"
                              f"choose one of {', '.join(known)}, or null to turn tool calling off")


def replica_env(cfg: ServeConfig) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{cfg.kv_cache_gib:g}"}
    if cfg.num_gpus_per_replica <= 0:
        # vLLM's CPU worker pins its threads to the cores VLLM_CPU_OMP_THREADS_BIND lists. One list for every replica
        # ("0-N") put all replicas of a node on the same cores while the others idled (two replicas, both on core 0);
        # unpinned, the OS spreads them, and OMP_NUM_THREADS holds each to the CPUs it reserved. A
        # VLLM_CPU_OMP_THREADS_BIND set where `rayft serve` runs is passed on as it is.
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus_per_replica))
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env["OMP_NUM_THREADS"] = str(threads)
        preload = cpu_preload()
        if preload:
            env["LD_PRELOAD"] = preload
    # Registry and storage sources are fetched in the replica, on any node: where the object store is goes with it.
    # Secrets (storage credentials, the artifact key) never travel in a runtime_env, which Ray shows to anyone who
    # can read the cluster's state: a node has them from its own environment or a mounted file (security.key_file).
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 CPU_DTYPE_ENV):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def build_llm_config(cfg: ServeConfig, model_id: str, with_lora: bool):
    from ray.serve.llm import LLMConfig

    on_gpu = cfg.num_gpus_per_replica > 0
    options: dict[str, Any] = {
        # The replica actor reserves nothing itself: its placement group's first bundle holds the engine's CPUs.
        "ray_actor_options": {"num_cpus": 0},
        # Serve lets a few more through than the ingress admits, so the ingress answers 503 + Retry-After itself.
        "max_ongoing_requests": cfg.max_ongoing_requests + 8,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        # A replica that cannot start (a bad model, a refused file) fails the deploy after 3 tries, not 20 (each try
        # starts vLLM again); `rayft serve` then prints the replica's reason.
        "max_constructor_retry_count": 3,
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return LLMConfig(
        # The replica replaces the source by the local folder it resolved (RayftLLMServer); vLLM never sees a URI.
        model_loading_config={"model_id": model_id, "model_source": model_id},
        engine_kwargs=engine_kwargs(cfg, with_lora),
        placement_group_config=None if on_gpu else {"bundles": [{"CPU": max(cfg.num_cpus_per_replica, 0.01)}],
                                                    "strategy": "PACK"},
        lora_config={"max_num_adapters_per_replica": cfg.adapter_cache_size} if with_lora else None,
        deployment_config=options,
        runtime_env={"env_vars": replica_env(cfg)},
    )


def build_deployment(cfg: ServeConfig, model_id: str, version: str, source: str, catalogue: dict[str, str],
                     tracking_uri: Optional[str], security: dict):
    """The bound Ray Serve LLM deployment of one served version."""
    from ray.serve.llm import build_llm_deployment

    llm_config = build_llm_config(cfg, model_id, with_lora=bool(catalogue))
    return build_llm_deployment(
        llm_config, name_prefix=f"rayft-vllm-{version}:", deployment_cls=RayftLLMServer,
        bind_kwargs={"rayft": {"source": source, "catalogue": catalogue, "tracking_uri": tracking_uri,
                               "security": security}})


PRIVATE_PREFIX = "rayft-replica-"


class PrivateFolder:
    """A 0700 folder for a replica's decrypted files, removed when the replica stops (or its process exits). Its name
    holds the replica's process id: a replica killed outright (SIGKILL, the OOM killer) cannot remove its folder, so
    the next replica started on the node removes every such folder whose process is gone."""

    def __init__(self):
        import atexit

        remove_orphaned_private_folders()
        self.path = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-")  # mkdtemp: mode 0700
        atexit.register(self.remove)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_orphaned_private_folders(root: Optional[str] = None) -> list[str]:
    """Remove the private folders (decrypted copies) of replicas whose process no longer runs: folders of this user
    named `rayft-replica-<pid>-...` in the temp folder. Returns the folders removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        pid = name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        if not name.startswith(PRIVATE_PREFIX) or not pid.isdigit():
            continue
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or _process_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def prepare(uri: str, tracking_uri: Optional[str], security: dict, private: PrivateFolder) -> str:
    """A local folder vLLM may read for `uri`: resolved (registry versions pinned and anchored), manifest checked,
    decrypted into the private folder when encrypted. A hub id is returned as it is (vLLM fetches it)."""
    from rayft.security.artifacts import prepared_for_load
    from rayft.security.config import SecurityConfig

    from .sources import resolve

    return prepared_for_load(resolve(uri, tracking_uri), private.path, SecurityConfig.model_validate(security or {}))


class AdapterLoader:
    """Ray Serve LLM's LoRA loader interface (`load_model_from_config`), over rayft's adapter catalogue."""

    def __init__(self, catalogue: dict[str, str], tracking_uri: Optional[str], security: dict,
                 private: PrivateFolder, **_ray_options):
        self.catalogue, self.tracking_uri, self.security, self.private = catalogue, tracking_uri, security, private
        self.loaded: dict[str, Any] = {}

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> Any:
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        if lora_model_id in self.loaded:
            return self.loaded[lora_model_id]
        name = lora_model_id.split(":", 1)[1]
        if name not in self.catalogue:  # the ingress answers 404 first; this guards direct handle calls
            raise KeyError(f"adapter {name!r} is not in this server's catalogue")
        path = await asyncio.to_thread(prepare, self.catalogue[name], self.tracking_uri, self.security, self.private)
        disk = DiskMultiplexConfig.model_validate({"model_id": lora_model_id, "max_total_tokens": None,
                                                   "local_path": path,
                                                   "lora_assigned_int_id": global_id_manager.next()})
        self.loaded[lora_model_id] = disk
        return disk


def _llm_server_base():
    from ray.serve.llm.deployment import LLMServer

    return LLMServer


class RayftLLMServer(_llm_server_base()):
    async def __init__(self, llm_config, *, rayft: dict):
        import functools

        self._rayft_private = PrivateFolder()
        local = await asyncio.to_thread(prepare, rayft["source"], rayft.get("tracking_uri"), rayft.get("security"),
                                        self._rayft_private)
        llm_config.model_loading_config.model_source = local
        llm_config._engine_config = None  # derived from the source; rebuilt from the local folder
        loader = functools.partial(AdapterLoader, rayft.get("catalogue") or {}, rayft.get("tracking_uri"),
                                   rayft.get("security"), self._rayft_private)
        try:
            await super().__init__(llm_config, model_downloader=loader)
        except BaseException:
            self._rayft_private.remove()
            raise

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        """One load per adapter at a time: Ray 2.60's check ("already loaded?") and vLLM's load are not atomic, so
        concurrent first requests for one adapter failed with "has already been loaded" (measured under load)."""
        from ray import serve

        name = serve.get_multiplexed_model_id()
        if not name:
            return await super()._maybe_resolve_lora_from_multiplex()
        locks = self.__dict__.setdefault("_rayft_lora_locks", {})
        async with locks.setdefault(name, asyncio.Lock()):
            await super()._maybe_resolve_lora_from_multiplex()

    async def __del__(self) -> None:
        try:
            await super().__del__()
        finally:
            private = getattr(self, "_rayft_private", None)
            if private is not None:
                private.remove()
