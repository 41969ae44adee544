"""Experiment: the demo's Django middleware marked sync-only, so Django runs them as one
sync chain in one thread (one hop in, one out) rather than two hops each."""

from django.utils.module_loading import import_string

from project.settings import MIDDLEWARE

NAMES = []
for _path in MIDDLEWARE:
    if _path.startswith("django."):
        _cls = import_string(_path)
        globals()[_cls.__name__] = type(_cls.__name__, (_cls,), {"async_capable": False})
        NAMES.append(f"{__name__}.{_cls.__name__}")
    else:
        NAMES.append(_path)
