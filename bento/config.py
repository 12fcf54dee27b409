"""The service's settings: one typed dataclass that reads the environment once, checks every value and names it.

Why: the service used to read ``os.environ`` in four modules, each with its own fallback, so ``SDLOOP_DEADLINE_S=abc``
crashed every worker at import and BentoML restarted them in a loop, and ``SDLOOP_POLL_S=-1`` made the poller spin.
Now ``ServeConfig.from_env()`` is the one reader: each value is read as every other setting is (``sdloop.overrides
.parse_value``: YAML 1.2, typed against the field), checked by the shared type check (``sdloop.config_types``) and
then by its range in ``__post_init__``; a bad one is one ``ConfigError`` naming the variable and what it accepts. ``sdloop serve`` builds it (and opens the store) before it becomes the
BentoML server, so a mistake is one line and exit 2 at start, never a worker restart loop.

The admin token is kept (the service compares requests against it) but never printed: ``public()`` says only whether
it is set, and the store URL is shown with its password masked (``sdloop.masking``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from sdloop.config_types import build_dataclass, check_types, check_value, help_field
from sdloop.configfile import ConfigError
from sdloop.errors import UserError
from sdloop.masking import mask_text, mask_url

BACKENDS = ("onnx", "pytorch")
AUTH_MODES = ("keys", "off")
OFF = ("off", "none", "0")


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _f(default: Any, env: str, help: str) -> Any:
    """A setting read from the environment variable ``env``."""
    return help_field(default, help, env=env)


@dataclass(repr=False)
class ServeConfig:
    """Everything the service can be told; each field names the environment variable it comes from."""

    deadline_s: float = _f(120.0, "SDLOOP_DEADLINE_S", "Default deadline of a request in seconds (its timeout_s), "
                                                       "in (0, 3600]; past it the generation stops and the answer "
                                                       "is 504.")
    poll_s: float = _f(5.0, "SDLOOP_POLL_S", "How often (s) a worker checks the champion pointer, in (0, 3600].")
    max_side: int = _f(1024, "SDLOOP_MAX_SIDE", "Largest width or height a request may ask for, in [8, 16384]; the "
                                                "model's own limits (its manifest) apply too.")
    max_steps: int = _f(200, "SDLOOP_MAX_STEPS", "Most denoising steps a request may ask for, in [1, 10000].")
    max_images: int = _f(4, "SDLOOP_MAX_IMAGES", "Most images one request may ask for, in [1, 64].")
    workers: int = _f(0, "SDLOOP_WORKERS", "Worker processes, one pipeline each, in [0, 1024]; 0: one per core.")
    threads: int = _f(8, "SDLOOP_THREADS", "Request threads per worker, in [1, 1024].")
    queue: int = _f(4, "SDLOOP_QUEUE", "Requests that may wait for a worker's pipeline besides the one it runs, in "
                                       "[0, 10000]; one more is answered 429 with Retry-After.")
    memory_mb: int = _f(0, "SDLOOP_MEMORY_MB", "Memory one worker may use in MiB, model included, in [0, 16777216]; a "
                                               "request that would pass it (as measured when the model loads) is "
                                               "refused with 413 naming the largest size that fits. 0: "
                                               "SDLOOP_MEMORY_SHARE of the host's memory split across the workers.")
    mmap_threshold_kib: int = _f(256, "SDLOOP_MMAP_THRESHOLD_KIB", "Allocations above this many KiB get their own "
                                                                   "mapping, returned when freed (lower, steadier "
                                                                   "peaks; 15-20% slower steps on the tiny model at "
                                                                   "128x128), in [0, 1048576]; 0: glibc's default.")
    memory_share: float = _f(0.8, "SDLOOP_MEMORY_SHARE", "Share of the host's (or container's) memory the workers "
                                                         "may use together when SDLOOP_MEMORY_MB is 0, in (0, 1].")
    jobs: int = _f(16, "SDLOOP_JOBS", "Generation jobs (POST /jobs) that may wait in a worker's job queue besides "
                                      "the one it runs, in [1, 10000]; one more is answered 429 with Retry-After.")
    job_ttl_s: float = _f(3600.0, "SDLOOP_JOB_TTL_S", "Seconds a finished job (its status and result images) is "
                                                      "kept after it ended, in [60, 604800]; then it is purged.")
    torch_threads: int = _f(0, "SDLOOP_TORCH_THREADS", "onnxruntime intra-op (and torch) threads per worker, in "
                                                       "[0, 1024]; 0: the export's own (its manifest's runtime) for "
                                                       "onnx, cores / workers for pytorch.")
    backend: str = _f("onnx", "SDLOOP_BACKEND", f"What runs a version, one of {BACKENDS}: onnx (the export, run as "
                                                "its manifest says) or pytorch (its source run, the fallback).")
    model_tag: str = _f("", "SDLOOP_MODEL_TAG", "Version served when there is no champion pointer (a Bento's "
                                                "sdloop:latest); empty: none.")
    image_dir: str = _f("", "SDLOOP_IMAGE_DIR", "Where generated PNGs are kept (empty: the workspace's "
                                                "generations/; off: nowhere).")
    store_url: str = _f("", "SDLOOP_STORE_URL", "The monitoring store's SQLAlchemy URL (empty: the workspace's "
                                                "sqlite file); printed with its password masked.")
    admin_token: str = _f("", "SDLOOP_ADMIN_TOKEN", "Bearer token of POST /admin/reload (empty: disabled); never "
                                                    "printed.")
    auth: str = _f("off", "SDLOOP_AUTH", f"Who may call, one of {AUTH_MODES}: keys (an API key from `sdloop keys "
                                         "create` in 'Authorization: Bearer sdk_...' on txt2img, feedback and "
                                         "admin) or off (anyone: only for 127.0.0.1; another --host refuses to "
                                         "start without keys unless SDLOOP_ALLOW_NO_AUTH=1).")
    allow_no_auth: bool = _f(False, "SDLOOP_ALLOW_NO_AUTH", "Serve on a non-loopback address with SDLOOP_AUTH=off "
                                                            "(anyone who reaches it may generate and rate); "
                                                            "`sdloop serve --insecure-no-auth` sets it.")
    rate_limit_per_min: int = _f(60, "SDLOOP_RATE_LIMIT_PER_MIN", "Requests per minute of a key without its own "
                                                                  "limit, per worker process, in [1, 1000000].")
    trusted_proxies: str = _f("", "SDLOOP_TRUSTED_PROXIES", "Comma-separated CIDRs of proxies whose X-Forwarded-For "
                                                            "is believed (e.g. 10.0.0.0/8); empty: none, the peer "
                                                            "address is logged as it is.")
    pack_champion: bool = _f(True, "SDLOOP_PACK_CHAMPION", "`bentoml build` puts the current champion into the "
                                                           "Bento (false: none).")

    def __post_init__(self) -> None:
        check_types(self, "")
        self._range("deadline_s", 0 < self.deadline_s <= 3600, "a number of seconds in (0, 3600]")
        self._range("poll_s", 0 < self.poll_s <= 3600, "a number of seconds in (0, 3600]")
        self._range("max_side", 8 <= self.max_side <= 16384, "an integer in [8, 16384]")
        self._range("max_steps", 1 <= self.max_steps <= 10000, "an integer in [1, 10000]")
        self._range("max_images", 1 <= self.max_images <= 64, "an integer in [1, 64]")
        self._range("workers", 0 <= self.workers <= 1024, "an integer in [0, 1024] (0: one per core)")
        self._range("threads", 1 <= self.threads <= 1024, "an integer in [1, 1024]")
        self._range("queue", 0 <= self.queue <= 10000, "an integer in [0, 10000]")
        self._range("memory_mb", 0 <= self.memory_mb <= 1 << 24, "an integer of MiB in [0, 16777216] (0: a share "
                                                                  "of the host)")
        self._range("memory_share", 0 < self.memory_share <= 1, "a share in (0, 1]")
        self._range("mmap_threshold_kib", 0 <= self.mmap_threshold_kib <= 1 << 20, "an integer of KiB in "
                                                                                   "[0, 1048576] (0: glibc's default)")
        self._range("jobs", 1 <= self.jobs <= 10000, "an integer in [1, 10000]")
        self._range("job_ttl_s", 60 <= self.job_ttl_s <= 604800, "a number of seconds in [60, 604800]")
        self._range("torch_threads", 0 <= self.torch_threads <= 1024, "an integer in [0, 1024] (0: the export's)")
        self._range("backend", self.backend in BACKENDS, f"one of {', '.join(BACKENDS)}")
        self._range("auth", self.auth in AUTH_MODES, f"one of {', '.join(AUTH_MODES)}")
        self._range("rate_limit_per_min", 1 <= self.rate_limit_per_min <= 1_000_000, "an integer in [1, 1000000]")
        self._range("trusted_proxies", self._networks() is not None, "comma-separated CIDRs, e.g. 10.0.0.0/8")
        self._range("model_tag", ":" in self.model_tag or not self.model_tag, "NAME:VERSION, e.g. sdloop:latest")
        if self.workers == 0:
            self.workers = _cores()

    def _range(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            env = _env_name(name)
            value = mask_url(getattr(self, name)) if name == "store_url" else getattr(self, name)
            raise ConfigError(f"{env}={value!r} is invalid: {allowed}.")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "ServeConfig":
        """The settings of this process's environment (unset or empty variables keep their defaults)."""
        environ = os.environ if environ is None else environ
        types = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            env, text = f.metadata["env"], environ.get(f.metadata["env"], "").strip()
            if text:
                values[f.name] = _read(env, text, types[f.name], f.metadata["help"])
        return build_dataclass(cls, values, prefix="")

    def _networks(self) -> Optional[list[Any]]:
        """The trusted proxies as networks, or None when one of them is not a CIDR."""
        import ipaddress

        try:
            return [ipaddress.ip_network(p.strip(), strict=False) for p in self.trusted_proxies.split(",")
                    if p.strip()]
        except ValueError:
            return None

    @property
    def proxy_networks(self) -> list[Any]:
        """The networks whose X-Forwarded-For the service believes (checked in ``__post_init__``)."""
        return self._networks() or []

    @property
    def keys_on(self) -> bool:
        return self.auth == "keys"

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_token)

    @property
    def generations_dir(self) -> Optional[Path]:
        """The folder generated PNGs go to, or None when keeping them is off."""
        from sdloop.workspace import home

        if self.image_dir.strip().lower() in OFF:
            return None
        return Path(self.image_dir).expanduser().resolve() if self.image_dir else home() / "generations"

    def resolved_store_url(self) -> str:
        from sdloop.workspace import home

        return self.store_url or f"sqlite:///{home() / 'monitor.db'}"

    def public(self) -> dict[str, Any]:
        """The settings as they may be shown (/info, logs): the store URL masked, the admin token only as set/unset."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["store_url"] = mask_url(self.resolved_store_url())
        out["admin_token"] = "set" if self.admin_token else "unset"
        return out

    def __repr__(self) -> str:
        return f"ServeConfig({', '.join(f'{k}={v!r}' for k, v in self.public().items())})"


def _env_name(field: str) -> str:
    return {f.name: f.metadata["env"] for f in dataclasses.fields(ServeConfig)}[field]


def _read(env: str, text: str, tp: Any, help: str) -> Any:
    """One variable's value, read and type-checked as any setting is; a wrong one names the variable and its help."""
    from sdloop.overrides import parse_value

    value = parse_value(text, tp)
    if tp is bool and type(value) is int and value in (0, 1):  # SDLOOP_PACK_CHAMPION=0, as a shell writes it
        value = bool(value)
    try:
        return check_value(env, value, tp)
    except ConfigError as e:
        message = mask_text(str(e), text) if env == "SDLOOP_STORE_URL" else str(e)
        if env == "SDLOOP_ADMIN_TOKEN":
            message = message.replace(text, "***")
        raise ConfigError(f"{message} {help}") from None


def check_store(cfg: ServeConfig, timeout_s: float = 20.0) -> str:
    """Open (and migrate) the monitoring store the workers will use; return its URL masked for printing.

    Raises ConfigError (one line, password masked) for a URL that is not a database URL, a database that does not
    answer within ``timeout_s`` or refuses the connection: the workers would otherwise fail on their first request.
    """
    url = cfg.resolved_store_url()
    outcome: dict[str, Any] = {}

    def attempt() -> None:
        from monitor.store import Store

        try:
            Store(url).close()
            outcome["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure to open it is the user's to fix: say it in one line
            outcome["error"] = e

    worker = threading.Thread(target=attempt, name="sdloop-store-check", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ConfigError(f"SDLOOP_STORE_URL={mask_url(url)}: the database did not answer within {timeout_s:.0f} s; "
                          "check the host, port and network.")
    if "error" in outcome:
        e = outcome["error"]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not isinstance(e, UserError):  # the store's own errors already say what to fix
            first = (f"the monitoring store {url} cannot be opened ({type(e).__name__}: {first}); fix "
                     "SDLOOP_STORE_URL or unset it for the workspace's sqlite file.")
        raise ConfigError(mask_text(first, url))
    return mask_url(url)


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address BentoML could not listen on (a port in use, a host that is not ours), by
    binding it for a moment before the server starts: otherwise each worker fails on its own, with a traceback."""
    import errno
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host} cannot be resolved ({e.strerror}); use an address such as 127.0.0.1 or "
                          "0.0.0.0.") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use (another server?); stop it or choose "
                                  "another with --port.") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --host or --port.") \
                from None


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(cfg: ServeConfig, host: str) -> None:
    """Refuse to serve a non-loopback address without keys unless the operator said so: with SDLOOP_AUTH=off anyone
    who reaches the port may generate (the host's CPU/GPU) and steer retraining through /feedback."""
    import ipaddress

    try:
        loopback = host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not cfg.keys_on and not cfg.allow_no_auth:
        raise ConfigError(f"--host {host} is not a loopback address and SDLOOP_AUTH=off: anyone could generate and "
                          "rate; create a key (`sdloop keys create`) and set SDLOOP_AUTH=keys, or pass "
                          "--insecure-no-auth (SDLOOP_ALLOW_NO_AUTH=1) to serve without keys anyway.")
