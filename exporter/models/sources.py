"""Models from outside the zoo, named with one syntax wherever a MODEL is accepted:

- `torchvision:NAME`: a classification model of `torchvision.models` (randomly initialised: nothing is downloaded);
- `timm:NAME`: a `timm` model (the optional `timm` extra), randomly initialised;
- `path/to/file.py:factory`: a Python file and a function in it returning an `nn.Module`;
- `path/to/model.onnx`: an existing ONNX file, verified and benchmarked across the ONNX runtimes (no PyTorch model).

Each becomes a `ModelSpec` like a registered model's, so train / build / verify / bench / report take it unchanged.
Its files live under `<artifacts>/<spec.dir_name>/` (a name without `:` or `/`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

from exporter.errors import UsageError
from exporter.models.registry import CpuRecipe, ModelSpec, Recipe, UnknownModelError

PREFIXES = ("torchvision", "timm")
DEFAULT_INPUT = (3, 224, 224)  # ImageNet's: what these models are designed for
# Inputs of a source model are scaled like the zoo's (pixels/255, no mean/std): nothing was trained with other values.
SOURCE_RECIPE = Recipe(lr=0.05, batch_size=32, epochs=1, resize=224, source="chosen")  # resize: the model's input
SOURCE_CPU_RECIPE = CpuRecipe(stages=((1.0, 1),), batch_size=32, lr=0.05, init="model's own")
# torchvision's own input sizes where they differ from 224 (their weights' transforms say so).
TORCHVISION_SIZES = {"inception_v3": 299}
# Builder arguments that remove training-only outputs (auxiliary heads): an exported model has one tensor output.
TORCHVISION_OPTIONS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


class ModelSourceError(UsageError):
    """A model source that cannot be loaded (missing file, no such factory, factory that returns no module)."""


def is_source(name: str) -> bool:
    """Whether `name` names a model source rather than a registered model."""
    return ":" in name or name.lower().endswith(".onnx")


def source_spec(name: str) -> ModelSpec:
    """The spec of a model source; UsageError in one line when it cannot be resolved."""
    text = name.strip()
    if text.lower().endswith(".onnx"):
        return _onnx_spec(str(Path(text).expanduser().resolve()))
    prefix, _, rest = text.partition(":")
    if prefix == "torchvision":
        return _torchvision_spec(rest)
    if prefix == "timm":
        return _timm_spec(rest)
    if prefix == "python":
        return _object_spec(text)
    path, _, factory = text.rpartition(":")
    if path.endswith(".py"):
        return _file_spec(str(Path(path).expanduser().resolve()), factory)
    raise UnknownModelError(f"unknown model source {text!r}: use torchvision:NAME, timm:NAME, path/to/file.py:factory "
                            "or path/to/model.onnx (or a registered name, see `exporter list`)")


def torchvision_classification_models() -> list[str]:
    """Every classification model name in `torchvision.models` (not detection, segmentation, video, …)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _unknown(kind: str, name: str, known: list[str], hint: str) -> UnknownModelError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    suggestion = f"did you mean {', '.join(f'{kind}:{c}' for c in close)}?" if close else hint
    return UnknownModelError(f"unknown {kind} model {name!r}: {suggestion}")


def _dir_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def source_folder(name: str) -> str:
    """A source's folder under the artifacts root, from its name alone (no import, no file read): the stem and
    a hash of the resolved path for files, the name with `:` replaced otherwise."""
    text = name.strip()
    if text.lower().endswith(".onnx"):
        path = str(Path(text).expanduser().resolve())
        return f"{_dir_name(Path(path).stem)}.onnx-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    path, _, factory = text.rpartition(":")
    if path.endswith(".py"):
        path = str(Path(path).expanduser().resolve())
        return f"{_dir_name(Path(path).stem)}.{factory}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return _dir_name(text)


def _spec(name: str, *, family: str, input_shape: tuple[int, int, int], builder: Callable[..., nn.Module],
          description: str, num_classes: int = 1000, dir_name: str | None = None,
          origin: dict[str, Any] | None = None) -> ModelSpec:
    return ModelSpec(name=name, family=family, seed=name, input_shape=input_shape, num_classes=num_classes,
                     recipe=dataclasses.replace(SOURCE_RECIPE, resize=input_shape[1]), description=description,
                     builder=builder, cpu_recipe=SOURCE_CPU_RECIPE,
                     source=family, dir_name=dir_name or source_folder(name), origin=origin or {})


# --- torchvision ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _torchvision_spec(name: str) -> ModelSpec:
    import torchvision

    known = torchvision_classification_models()
    if name not in known:
        raise _unknown("torchvision", name, known, "`exporter list --torchvision` lists the classification models")
    size = TORCHVISION_SIZES.get(name, 224)

    def build(*, in_channels: int = 3, num_classes: int = 1000, **options: Any) -> nn.Module:
        if in_channels != 3:
            raise UsageError(f"torchvision:{name} takes 3 input channels, not {in_channels} (grayscale data is "
                             "repeated to 3 channels)")
        kwargs = {**TORCHVISION_OPTIONS.get(name, {}), **options}
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return _spec(f"torchvision:{name}", family="torchvision", input_shape=(3, size, size), builder=build,
                 description=f"torchvision.models.{name} (torchvision {torchvision.__version__}, random init)",
                 origin={"library": "torchvision", "version": torchvision.__version__, "name": name})


# --- timm -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _timm_spec(name: str) -> ModelSpec:
    try:
        import timm
    except ImportError:
        raise UsageError(f"timm:{name} needs the timm library: pip install 'exporter[timm]'") from None
    if not timm.is_model(name):  # accepts pretrained tags too (resnet50.a1_in1k)
        raise _unknown("timm", name, timm.list_models(), "timm.list_models() lists them")
    config = timm.models.get_pretrained_cfg(name)
    shape = tuple(int(d) for d in (getattr(config, "input_size", None) or DEFAULT_INPUT))

    def build(*, in_channels: int = 3, num_classes: int = 1000, **options: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)

    return _spec(f"timm:{name}", family="timm", input_shape=shape, builder=build,  # type: ignore[arg-type]
                 description=f"timm {name} (timm {timm.__version__}, random init)",
                 origin={"library": "timm", "version": timm.__version__, "name": name})


# --- a Python file ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _file_spec(path: str, factory: str) -> ModelSpec:
    file = Path(path)
    if not file.is_file():
        raise ModelSourceError(f"model file {path} does not exist")
    if not factory.isidentifier():
        raise ModelSourceError(f"{file.name}:{factory}: the factory must be a function name defined in {file.name}")
    function, module = _load_factory(file, factory)
    declared = getattr(function, "input_shape", None) or getattr(module, "INPUT_SHAPE", None) or DEFAULT_INPUT
    try:
        shape = tuple(int(d) for d in declared)
        assert len(shape) == 3 and min(shape) > 0
    except (TypeError, ValueError, AssertionError):
        raise ModelSourceError(f"{file.name}: INPUT_SHAPE must be (C, H, W) positive integers, got {declared!r}") \
            from None
    accepted = _accepted_arguments(function)

    def build(*, in_channels: int = shape[0], num_classes: int | None = None, **options: Any) -> nn.Module:
        kwargs = dict(options)
        if "in_channels" in accepted:
            kwargs["in_channels"] = in_channels
        elif in_channels != shape[0]:
            raise UsageError(f"{file.name}:{factory} takes no in_channels argument, so the model keeps its "
                             f"{shape[0]} input channels (got {in_channels})")
        if "num_classes" in accepted and num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = function(**kwargs)
        if not isinstance(model, nn.Module):
            raise ModelSourceError(f"{file.name}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    name = f"{path}:{factory}"
    return _spec(name, family="file", input_shape=shape, builder=build, num_classes=_default_classes(build, shape),
                 description=(inspect.getdoc(function) or f"{file.name}:{factory}").splitlines()[0],
                 dir_name=source_folder(name),
                 origin={"file": path, "factory": factory, "sha256": digest})


def _load_factory(file: Path, factory: str) -> tuple[Callable[..., Any], Any]:
    module_name = f"exporter_user_model_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ModelSourceError(f"cannot import {file}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  (the user's code: any error is reported in one line)
        sys.modules.pop(module_name, None)
        raise ModelSourceError(f"importing {file.name} failed: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    function = getattr(module, factory, None)
    if not callable(function):
        defined = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module_name)
        raise ModelSourceError(f"{file.name} has no function {factory!r}"
                               + (f"; it defines {', '.join(defined)}" if defined else ""))
    return function, module


def _accepted_arguments(function: Callable[..., Any]) -> set[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return {"in_channels", "num_classes"}
    return {p.name for p in parameters}


def _default_classes(build: Callable[..., nn.Module], shape: tuple[int, int, int]) -> int:
    """The class count of the model's own head (its output width on a meta input)."""
    import torch

    try:
        try:
            with torch.device("meta"):
                model = build().eval()
            parameter = next(model.parameters(), None)  # an object's copy keeps its real tensors
            device = parameter.device if parameter is not None else torch.device("meta")
            with torch.no_grad():
                output = model(torch.zeros((1, *shape), device=device))
        except UsageError:
            raise
        except Exception:  # noqa: BLE001  (data-dependent code cannot run on meta tensors: run it for real)
            with torch.no_grad():
                output = build().eval()(torch.zeros((1, *shape)))
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"the model does not run on a {'×'.join(map(str, shape))} input: "
                               f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]} (declare "
                               "INPUT_SHAPE = (C, H, W) in the file)") from None
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise ModelSourceError("the model must return one (batch, classes) tensor, got "
                               + (f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor)
                                  else type(output).__name__))
    return int(output.shape[1])


# --- a Python object (the API's `exporter.build(module)`) ----------------------------------------------------

_OBJECTS: dict[str, ModelSpec] = {}


def register_object(model: nn.Module, input_shape: tuple[int, int, int], name: str | None = None) -> ModelSpec:
    """A spec for an in-memory module (this process only): `python:NAME`. Its builder returns a copy of it."""
    import copy

    if name:
        key = f"python:{_dir_name(name)}"
    else:  # two objects of one class (different heads, different layers) must not share a folder or a spec
        layout = [type(model).__qualname__, *[(k, tuple(v.shape)) for k, v in model.state_dict().items()]]
        key = f"python:{_dir_name(type(model).__name__)}-{hashlib.sha256(repr(layout).encode()).hexdigest()[:8]}"
    template = copy.deepcopy(model).cpu().eval()

    def build(*, in_channels: int = input_shape[0], num_classes: int | None = None, **options: Any) -> nn.Module:
        if in_channels != input_shape[0] or options:
            raise UsageError(f"{key} is a Python object: it is exported as it is ({input_shape[0]} input channels)")
        return copy.deepcopy(template)

    spec = _spec(key, family="python", input_shape=input_shape, builder=build,
                 num_classes=_default_classes(build, input_shape),
                 description=f"{type(model).__name__} (Python object)",
                 origin={"object": f"{type(model).__module__}.{type(model).__qualname__}"})
    _OBJECTS[key] = spec
    return spec


def _object_spec(key: str) -> ModelSpec:
    spec = _OBJECTS.get(key)
    if spec is None:
        raise ModelSourceError(f"{key} was a Python object passed to exporter.build() in another process; rebuild "
                               "it from a file (path/to/file.py:factory) to use it from the command line")
    return spec


# --- an ONNX file -----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _onnx_spec(path: str) -> ModelSpec:
    file = Path(path)
    if not file.is_file():
        raise ModelSourceError(f"ONNX file {path} does not exist")
    try:
        import onnx

        model = onnx.load(str(file), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"{file.name} is not a readable ONNX model: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelSourceError(f"{file.name} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                               "exporter takes image classifiers with one image input and one logits output")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelSourceError(f"{file.name}: input {inputs[0].name!r} must be float32 images (N×C×H×W), got "
                               f"{onnx.TensorProto.DataType.Name(inputs[0].type.tensor_type.elem_type)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ModelSourceError(f"{file.name}: input {inputs[0].name!r} must be N×C×H×W with fixed C, H, W; got "
                               f"{['?' if d is None else d for d in shape]}")
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    classes = out_dims[-1].dim_value if len(out_dims) == 2 and out_dims[-1].HasField("dim_value") else None
    if classes is None:
        raise ModelSourceError(f"{file.name}: output {model.graph.output[0].name!r} must be (batch, classes) with a "
                               "fixed class count")

    def build(**_: Any) -> nn.Module:
        raise UsageError(f"{file.name} is an ONNX file: it has no PyTorch model to train or run eagerly")

    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    return _spec(path, family="onnx", input_shape=(int(shape[1]), int(shape[2]), int(shape[3])), builder=build,
                 num_classes=int(classes), description=f"ONNX file {file.name}",
                 dir_name=source_folder(path),
                 origin={"file": path, "sha256": digest, "input_name": inputs[0].name,
                         "output_name": model.graph.output[0].name,
                         "static_batch": shape[0] if shape[0] else None})
