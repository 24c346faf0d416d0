"""Every public name of the Python client (agent_vm.__all__), and every public
method and property of its classes, has a docstring: the pdoc reference has
something to say for each. Exit 1 naming the ones without."""

from __future__ import annotations

import inspect
import sys

import agent_vm


def undocumented() -> list[str]:
    missing = []
    for name in agent_vm.__all__:
        obj = getattr(agent_vm, name)
        if not inspect.getdoc(obj):
            missing.append(f"agent_vm.{name}")
        if not inspect.isclass(obj) or issubclass(obj, BaseException):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            target = member.fget if isinstance(member, property) else member
            if isinstance(target, (classmethod, staticmethod)):
                target = target.__func__
            if callable(target) and not (target.__doc__ or "").strip():
                missing.append(f"agent_vm.{name}.{attr}")
    return missing


def main() -> int:
    missing = undocumented()
    if missing:
        print(f"{len(missing)} public name(s) of agent_vm have no docstring:", file=sys.stderr)
        for what in missing:
            print(f"  {what}", file=sys.stderr)
        return 1
    print(f"agent_vm: {len(agent_vm.__all__)} public names, all documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())
