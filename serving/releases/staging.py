"""What the admin API may stage: :class:`StagingPolicy`, the server's own config that an admin
key cannot widen (which model folders, which vLLM arguments, flags and environment variables),
so that holding the admin key stages and promotes models but never runs code on the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import Field, field_validator

from ground.config import StrictModel, data_dir
from serving.engine.vllm_server import VLLMArgs
from serving.releases.records import ReleaseError

# VLLMArgs fields the admin API may set by default (placement and size, not what runs): anything
# else must equal the server's own default_args. A test keeps this list and VLLMArgs in step.
DEFAULT_ALLOWED_ARGS = (
    "dtype",
    "max_model_len",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "enforce_eager",
    "max_num_seqs",
    "tensor_parallel_size",
    "data_parallel_size",
    "startup_timeout_s",
    "startup_quiet_s",
    "tool_call_parser",
)
SERVER_ONLY_ARGS = ("extra_args", "env")
"""Fields only the server's config sets; a request may narrow them via allowed_flags/allowed_env."""
# Flags and variables that make vLLM load code or libraries named by whoever sets them: the admin
# API never accepts them, whatever the config lists (set them in the server's default_args).
_CODE_FLAGS = ("--trust-remote-code", "--tool-parser-plugin", "--reasoning-parser-plugin",
               "--worker-extension-cls", "--middleware", "--logits-processors", "--chat-template",
               "--allowed-local-media-path")
_CODE_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "VLLM_PLUGINS")
_CODE_ENV = ("PATH", "HOME", "BASH_ENV", "ENV", "SHELL")


class StagingError(ReleaseError):
    """A stage request outside what the server's staging policy allows (names the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StagingPolicy(StrictModel):
    """What the admin API may stage: the server's own config, which the admin key cannot widen.

    An admin key stages and promotes models; it must not run code on the host. So a staged
    model folder must lie under ``model_roots`` (after resolving links), and the vLLM arguments
    of a request may differ from the server's ``default_args`` only in ``allowed_args``, in
    ``extra_args`` flags listed in ``allowed_flags`` and in ``env`` names listed in ``allowed_env``.
    """

    model_roots: list[str] = Field(
        default_factory=lambda: ["runs", "models", "releases"],
        description="Folders a staged model must be inside (relative = under the data dir).",
    )
    allow_hub_ids: bool = Field(False, description="Accept hub ids (org/name) as model_dir.")
    allowed_args: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_ARGS),
        description="VLLMArgs fields a request may set to other values than default_args.",
    )
    allowed_flags: list[str] = Field(
        default_factory=list,
        description="`vllm serve` flags a request may add in extra_args (e.g. --enable-prefix-caching).",
    )
    allowed_env: list[str] = Field(
        # Which of vLLM's own kernels not to use: how the loop stages a W4A16 candidate per
        # kernel (Marlin vs the default) on GPUs. It chooses among vLLM's built-in kernels only.
        default_factory=lambda: ["VLLM_DISABLED_KERNELS"],
        description="Environment variables a request may set.",
    )

    @field_validator("allowed_args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(VLLMArgs.model_fields))
        if unknown:
            raise ValueError(f"not VLLMArgs fields: {unknown}")
        held = sorted(set(v) & set(SERVER_ONLY_ARGS))
        if held:
            raise ValueError(f"{held} are governed by allowed_flags / allowed_env, not listed here")
        return v

    @field_validator("allowed_flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not flag.startswith("--"):
                raise ValueError(f"{flag!r}: flags start with '--'")
            if flag.split("=")[0] in _CODE_FLAGS:
                raise ValueError(f"{flag!r} loads code: set it in the server's default_args instead")
        return v

    @field_validator("allowed_env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for name in v:
            if name in _CODE_ENV or name.startswith(_CODE_ENV_PREFIXES):
                raise ValueError(f"{name!r} can load code: set it in the server's default_args instead")
        return v

    def roots(self) -> list[Path]:
        return [(Path(r) if Path(r).is_absolute() else data_dir() / r).resolve() for r in self.model_roots]

    def check(
        self, model_dir: str, args: VLLMArgs | None, defaults: VLLMArgs, known: Iterable[str] = ()
    ) -> str:
        """The model folder to stage (resolved); raise :class:`StagingError` naming what is not allowed.

        ``known`` are model folders of releases this server already has (its initial model, what
        was staged before): staging one of them again (a baseline copy of live) adds nothing new.
        """
        path = Path(model_dir).expanduser()
        if not path.is_absolute() and not path.exists() and model_dir.count("/") == 1:
            if not self.allow_hub_ids:
                raise StagingError("model_dir", "hub ids are not allowed (releases.staging.allow_hub_ids)")
        else:
            real = path.resolve()
            already = {Path(k).resolve() for k in known}
            if real not in already and not any(real.is_relative_to(r) for r in self.roots()):
                raise StagingError(
                    "model_dir",
                    f"{real} is not inside the folders this server stages from "
                    f"({', '.join(map(str, self.roots()))}; releases.staging.model_roots)",
                )
            model_dir = str(real)
        if args is None:
            return model_dir
        for name in VLLMArgs.model_fields:
            mine, theirs = getattr(defaults, name), getattr(args, name)
            if mine == theirs or name in self.allowed_args:
                continue
            if name == "extra_args":
                self._check_flags(theirs)
            elif name == "env":
                bad = sorted(k for k, v in theirs.items() if k not in self.allowed_env and defaults.env.get(k) != v)
                if bad:
                    raise StagingError("args.env", f"{bad} not in releases.staging.allowed_env")
            else:
                raise StagingError(
                    f"args.{name}",
                    f"this server does not let the admin API set it ({theirs!r}; its default is "
                    f"{mine!r}); add it to releases.staging.allowed_args in the server's config",
                )
        return model_dir

    def _check_flags(self, extra: list[str]) -> None:
        expect_value = False
        for tok in extra:
            if tok.startswith("--"):
                name = tok.split("=")[0]
                if name in _CODE_FLAGS or name not in {f.split("=")[0] for f in self.allowed_flags}:
                    raise StagingError(
                        "args.extra_args", f"{name} is not in releases.staging.allowed_flags"
                    )
                expect_value = "=" not in tok
            elif not expect_value:
                raise StagingError("args.extra_args", f"{tok!r} is not a value of an allowed flag")
            else:
                expect_value = False

