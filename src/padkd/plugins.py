"""Extensions: installed packages register their own methods, weightings, models and datasets.

A package declares an entry point in the `padkd.plugins` group, e.g. in its pyproject.toml

    [project.entry-points."padkd.plugins"]
    mykd = "mykd.padkd_plugin"

and that module registers components with padkd's decorators (`@METHODS.register("mine")`).
Configs can then name them like built-ins. Installing the package is the explicit opt-in: a config
file itself can never import code.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from padkd.errors import PadkdError

GROUP = "padkd.plugins"


def load_plugins() -> list[str]:
    """Import every module advertised under the `padkd.plugins` entry-point group; their names."""
    loaded = []
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as err:  # noqa: BLE001  (a broken plugin is the user's to fix: say which)
            raise PadkdError(f"padkd plugin '{ep.name}' ({ep.value}) failed to import: "
                             f"{type(err).__name__}: {err}; fix or uninstall that package") from None
        loaded.append(ep.name)
    return loaded
