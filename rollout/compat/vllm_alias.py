"""The opt-in ``vllm`` alias: ``import vllm`` (and the module paths RL frameworks import)
resolving to rollout, so that a framework written against vLLM runs on rollout unchanged.

``install_vllm_alias()`` puts ``vllm_alias_root/`` first on ``sys.path``: it holds a package
``vllm`` whose modules re-export rollout's classes under vLLM's paths, and a
``vllm-0.22.0.dist-info`` so that ``importlib.metadata.version("vllm")`` (which TRL and verl
check before importing) answers ``VLLM_ALIAS_VERSION``: the vLLM release whose API is
mirrored, with the local label ``+rollout``. Nothing is installed; the alias lasts for this
process. For a launcher's child processes (``torchrun``, ``accelerate launch``) put the
directory ``python -m rollout.compat.vllm_alias --path`` prints on ``PYTHONPATH``.

It never shadows a real vLLM silently: with vLLM importable, ``install_vllm_alias`` refuses
unless ``override=True``, which logs a warning.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from rollout.errors import RolloutError

logger = logging.getLogger(__name__)

#: ``importlib.metadata.version("vllm")`` under the alias (also ``vllm.__version__``).
VLLM_ALIAS_VERSION = "0.22.0+rollout"
ALIAS_ROOT = Path(__file__).resolve().parent / "vllm_alias_root"


class VllmAliasError(RolloutError, RuntimeError):
    """A real vLLM is importable (or imported) and ``override`` was not given."""


def alias_path() -> str:
    """The directory to put on ``sys.path`` / ``PYTHONPATH`` for ``import vllm`` to be rollout."""
    return str(ALIAS_ROOT)


def is_alias_active() -> bool:
    """Whether ``import vllm`` resolves (or resolved) to this alias."""
    mod = sys.modules.get("vllm")
    if mod is not None:
        return getattr(mod, "IS_ROLLOUT_ALIAS", False)
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(ALIAS_ROOT)


def install_vllm_alias(override: bool = False) -> None:
    """Make ``import vllm`` resolve to rollout in this process (idempotent). Raises
    ``VllmAliasError`` when a real vLLM is importable, unless ``override=True``: then the
    alias is put in front of it, with a warning. A real vLLM already imported cannot be
    replaced (its classes are in use): that always raises."""
    if is_alias_active():
        if alias_path() not in sys.path:
            sys.path.insert(0, alias_path())
        return
    loaded = sys.modules.get("vllm")
    if loaded is not None:
        raise VllmAliasError(
            f"a real vllm is already imported ({getattr(loaded, '__file__', '?')}): install the alias before "
            "anything imports vllm, in a process without it"
        )
    real = importlib.util.find_spec("vllm")
    if real is not None:
        if not override:
            raise VllmAliasError(
                f"vLLM is installed ({real.origin}); install_vllm_alias(override=True) shadows it with rollout "
                "for this process"
            )
        logger.warning("the rollout vllm alias shadows the installed vLLM at %s in this process", real.origin)
    sys.path.insert(0, alias_path())
    importlib.invalidate_caches()
    logger.info("import vllm now resolves to rollout (alias %s at %s)", VLLM_ALIAS_VERSION, alias_path())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", action="store_true", help="print the directory to prepend to PYTHONPATH")
    args = parser.parse_args(argv)
    if args.path:
        print(alias_path())
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
