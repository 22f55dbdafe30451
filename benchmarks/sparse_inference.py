"""What sparsity buys on real hardware: dense against sparse inference latency, and file sizes.

For each model, sparsity (ERK masks over every convolution and linear weight, random positions) and batch
size, the dense model and its ``sparse_inference(mode="auto")`` copy run side by side (alternately, so that
both see the same machine state and each other's cache traffic), and the median of each is reported beside
the theoretical FLOP ratio. The per-layer timings that "auto" takes are summed by layer kind (linear, 1×1
convolution, k×k convolution through im2col), dense against forced-sparse, which shows where the sparse
kernels win and where they lose. File sizes: the dense ``torch.save`` state_dict, and ``save_sparse`` in
float32 and float16.

Constant fan-in (``--structured``): single linear layers of ViT-B/16's MLP shapes (768→3072, 3072→768) with a
random constant fan-in mask, dense against CSR and condensed kernels of the same mask, run alternately; then
whole networks at one sparsity: dense, unstructured ERK masks under ``mode="auto"`` (dense or CSR per layer),
and constant fan-in ERK masks (SRigL's) under ``mode="auto"`` (dense, CSR or condensed per layer).

    python benchmarks/sparse_inference.py [--models lenet300_100 mlp4096 resnet50 mobilenet_v1 ...]
        [--sparsities 0.8 0.9 0.95 0.98 0.99] [--batches 1 64] [--threads 2] [--output DIR]
    python benchmarks/sparse_inference.py --structured [--sparsities 0.8 0.9 0.95 0.99] [--batches 1 64 256]
        [--models vit_tiny resnet50 vit_b_16] [--network-sparsity 0.9] [--network-batches 1 64]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from lightning_rigl.export import CondensedLinear, SparseLinear, save_sparse, sparse_inference
from lightning_rigl.flops import forward_flops
from lightning_rigl.models import create_model
from lightning_rigl.sparsity import layer_densities, live_count, mask_densities, random_masks
from lightning_rigl.sparsity.structure import ConstantFanIn

INPUTS = {"lenet300_100": (1, 28, 28), "mlp4096": (4096,), "resnet50": (3, 224, 224),
          "mobilenet_v1": (3, 224, 224), "vit_tiny": (1, 28, 28), "vit_b_16": (3, 224, 224)}
IMAGENET = ("resnet50", "mobilenet_v1", "vit_b_16")  # 1000 classes, and seconds per run at batch 64
UNSTRUCTURED_MODELS = ["lenet300_100", "mlp4096", "resnet50", "mobilenet_v1"]
VIT_B_MLP = ((768, 3072), (3072, 768))  # (in, out) of ViT-B/16's two MLP layers
KINDS = ("linear", "conv1x1", "conv")


def build(arch: str) -> nn.Module:
    if arch == "mlp4096":  # the two-layer block: 4096 -> 4096 -> ReLU -> 4096
        return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096))
    return create_model(arch, num_classes=1000 if arch in IMAGENET else 10)


def sparsify(model: nn.Module, sparsity: float, seed: int = 0, fan_in: bool = False) -> dict[str, torch.Tensor]:
    """ERK masks at random positions (with a constant fan-in, each layer's count rounded down to a whole fan-in,
    if ``fan_in``), applied to the weights; returns them."""
    densities = layer_densities(model, sparsity, "erk")
    params = {name: model.get_parameter(name) for name in densities}
    structure = ConstantFanIn() if fan_in else None
    if structure is not None:
        densities = {name: d if d == 1 else structure.layer_count(
            name, params[name].shape, live_count(params[name].numel(), d)) / params[name].numel()
            for name, d in densities.items()}
    masks = random_masks(params, densities, seed, structure)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    return masks


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def alternately(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of each model, run in turn on ``x`` after one warm-up each."""
    times: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        for index in range(repeats + 1):
            for label, model in models.items():
                start = time.perf_counter()
                model(x)
                if index:
                    times[label].append(1e3 * (time.perf_counter() - start))
    return {label: statistics.median(values) for label, values in times.items()}


def side_by_side(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median milliseconds of the dense and the sparse model, run alternately after one warm-up each."""
    times = alternately({"dense": dense, "sparse": sparse}, x, repeats)
    return times["dense"], times["sparse"]


def fan_in_layer_rows(sparsities: list[float], batches: list[int]) -> list[dict]:
    """One linear layer of each ViT-B/16 MLP shape with a random constant fan-in mask: dense, CSR and condensed,
    median of 201 runs at batch 1 (a fraction of a millisecond each) and of 51 above."""
    rows = []
    for n_in, n_out in VIT_B_MLP:
        for sparsity in sparsities:
            torch.manual_seed(0)
            layer = nn.Linear(n_in, n_out)
            fan_in = n_in - int(sparsity * n_in)
            mask = ConstantFanIn().random_mask(layer.weight.shape, fan_in * n_out, torch.Generator().manual_seed(0),
                                               torch.device("cpu"))
            with torch.no_grad():
                layer.weight.mul_(mask)
            kernels = {"dense": layer, "csr": SparseLinear(layer, mask), "condensed": CondensedLinear(layer, mask)}
            for batch in batches:
                times = alternately(kernels, torch.randn(batch, n_in), 201 if batch == 1 else 51)
                row = {"shape": f"{n_in}→{n_out}", "sparsity": sparsity, "fan_in": fan_in, "batch": batch, **times}
                rows.append(row)
                print(f"linear {row['shape']} s={sparsity} (fan-in {fan_in}) batch {batch}: dense {times['dense']:.3f}"
                      f" ms, CSR {times['csr']:.3f} ms, condensed {times['condensed']:.3f} ms: condensed "
                      f"{times['dense'] / times['condensed']:.2f}x dense, {times['csr'] / times['condensed']:.2f}x CSR",
                      flush=True)
    return rows


def fan_in_network_rows(models: list[str], sparsity: float, batches: list[int]) -> list[dict]:
    """Whole networks: dense, unstructured masks (dense or CSR per layer) and constant fan-in masks (dense, CSR
    or condensed per layer), each converted under mode="auto" on the batch it is timed on."""
    rows = []
    for arch in models:
        for batch in batches:
            repeats = 3 if arch in IMAGENET and batch > 1 else 15
            x = torch.randn(batch, *INPUTS[arch])
            versions: dict[str, nn.Module] = {}
            kernels: dict[str, dict[str, int]] = {}
            for label, fan_in in (("unstructured", False), ("constant fan-in", True)):
                torch.manual_seed(0)
                model = build(arch).eval()
                masks = sparsify(model, sparsity, fan_in=fan_in)
                versions.setdefault("dense", model)
                versions[label] = sparse_inference(model, masks, example_input=x, mode="auto", repeats=repeats)
                kernels[label] = {kernel: sum(c.kernel == kernel for c in versions[label].sparse_layers)
                                  for kernel in ("dense", "csr", "condensed")}
            times = alternately(versions, x, repeats)
            row = {"model": arch, "sparsity": sparsity, "batch": batch, **times, "kernels": kernels}
            rows.append(row)
            print(f"{arch} s={sparsity} batch {batch}: dense {times['dense']:.2f} ms, unstructured "
                  f"{times['unstructured']:.2f} ms ({kernels['unstructured']}), constant fan-in "
                  f"{times['constant fan-in']:.2f} ms ({kernels['constant fan-in']})", flush=True)
    return rows


def file_sizes(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    sizes = {"dense_checkpoint": buffer.getbuffer().nbytes}
    with tempfile.TemporaryDirectory() as folder:
        for label, dtype in (("compact_fp32", None), ("compact_fp16", torch.float16)):
            sizes[label] = save_sparse(model, Path(folder) / f"{label}.safetensors", masks, dtype=dtype).stat().st_size
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(INPUTS), default=None,
                        help=f"default: {' '.join(UNSTRUCTURED_MODELS)}; with --structured, vit_tiny resnet50")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--structured", action="store_true", help="constant fan-in: layers, then networks")
    parser.add_argument("--network-sparsity", type=float, default=0.9)
    parser.add_argument("--network-batches", nargs="+", type=int, default=[1, 64],
                        help="with --structured: the batch sizes of the whole networks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.structured:
        structured(args, machine)
        return
    args.models = args.models or UNSTRUCTURED_MODELS
    print(f"# sparse inference, {machine}")
    rows = []
    for arch in args.models:
        for sparsity in args.sparsities:
            torch.manual_seed(0)
            model = build(arch).eval()
            masks = sparsify(model, sparsity)
            densities = mask_densities(masks)
            shape = INPUTS[arch]
            flop_ratio = forward_flops(model, shape, densities) / forward_flops(model, shape)
            sizes = file_sizes(model, masks)
            for batch in args.batches:
                repeats = 3 if arch in IMAGENET and batch > 1 else 15
                x = torch.randn(batch, *shape)
                inference = sparse_inference(model, masks, example_input=x, mode="auto", repeats=repeats)
                dense_ms, sparse_ms = side_by_side(model, inference, x, repeats)
                by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
                for choice in inference.sparse_layers:
                    if choice.kind in KINDS and choice.times_ms:
                        by_kind[choice.kind][0] += choice.times_ms["dense"]
                        by_kind[choice.kind][1] += choice.times_ms["csr"]
                        by_kind[choice.kind][2] += int(choice.converted)
                row = {"model": arch, "sparsity": sparsity, "batch": batch, "flop_ratio": flop_ratio,
                       "dense_ms": dense_ms, "auto_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                       "converted": sum(c.converted for c in inference.sparse_layers),
                       "layers": len(inference.sparse_layers), "by_kind": dict(by_kind), **sizes}
                rows.append(row)
                kinds = "; ".join(f"{kind} {d:.1f}/{s:.1f} ms ({d / s:.2f}x, {n} kept sparse)"
                                  for kind, (d, s, n) in by_kind.items())
                print(f"{arch} s={sparsity} batch {batch}: FLOPs {flop_ratio:.3f}x; dense {dense_ms:.2f} ms, auto "
                      f"{sparse_ms:.2f} ms ({dense_ms / sparse_ms:.2f}x, {row['converted']}/{row['layers']} layers "
                      f"sparse); forced sparse per kind, dense/sparse: {kinds}", flush=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "sparse_inference.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    (output / "sparse_inference.md").write_text(markdown(rows, machine))
    print(f"wrote {output / 'sparse_inference.md'}")


def structured(args: argparse.Namespace, machine: str) -> None:
    print(f"# constant fan-in inference, {machine}")
    layers = fan_in_layer_rows(args.sparsities, args.batches)
    networks = fan_in_network_rows(args.models or ["vit_tiny", "resnet50"], args.network_sparsity,
                                   args.network_batches)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "layers": layers, "networks": networks}
    (output / "fan_in_inference.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"Measured on {machine}. Median ms, the versions run alternately.", "",
             "| layer | sparsity | fan-in | batch | dense ms | CSR ms | condensed ms | condensed vs dense | "
             "condensed vs CSR |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['sparsity']} | {r['fan_in']} | {r['batch']} | {r['dense']:.3f} | {r['csr']:.3f} | "
              f"{r['condensed']:.3f} | {r['dense'] / r['condensed']:.2f}x | {r['csr'] / r['condensed']:.2f}x |"
              for r in layers]
    lines += ["", "| model | sparsity | batch | dense ms | unstructured, auto ms | constant fan-in, auto ms | "
              "layers dense / CSR / condensed (constant fan-in) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sparsity']} | {r['batch']} | {r['dense']:.2f} | {r['unstructured']:.2f} "
              f"({r['dense'] / r['unstructured']:.2f}x) | {r['constant fan-in']:.2f} "
              f"({r['dense'] / r['constant fan-in']:.2f}x) | " + " / ".join(
                  str(r["kernels"]["constant fan-in"][k]) for k in ("dense", "csr", "condensed")) + " |"
              for r in networks]
    (output / "fan_in_inference.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {output / 'fan_in_inference.md'}")


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}. Latency: median ms, dense and `sparse_inference(mode=\"auto\")` run "
             "alternately. Per kind: the layers of that kind timed dense / forced sparse (ms) on the same input.", "",
             "| model | sparsity | batch | FLOPs (x dense) | dense ms | auto ms | speed-up | layers sparse | "
             "linear d/s ms | 1×1 conv d/s ms | k×k conv d/s ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kinds = []
        for kind in KINDS:
            dense, sparse, _ = row["by_kind"].get(kind, (0, 0, 0))
            kinds.append(f"{dense:.2f} / {sparse:.2f} ({dense / sparse:.2f}x)" if sparse else "")
        lines.append(f"| {row['model']} | {row['sparsity']} | {row['batch']} | {row['flop_ratio']:.3f} | "
                     f"{row['dense_ms']:.2f} | {row['auto_ms']:.2f} | {row['speedup']:.2f}x | "
                     f"{row['converted']}/{row['layers']} | " + " | ".join(kinds) + " |")
    lines += ["", "| model | sparsity | dense checkpoint (MB) | compact fp32 (MB) | compact fp16 (MB) |",
              "|---|---|---|---|---|"]
    seen = set()
    for row in rows:
        if (row["model"], row["sparsity"]) in seen:
            continue
        seen.add((row["model"], row["sparsity"]))
        lines.append(f"| {row['model']} | {row['sparsity']} | {row['dense_checkpoint'] / 1e6:.3f} | "
                     f"{row['compact_fp32'] / 1e6:.3f} | {row['compact_fp16'] / 1e6:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
