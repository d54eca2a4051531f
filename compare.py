"""``robust compare``: train standard, adversarial and noise-augmented models, attack, certify, report.

Every stage goes through the same LightningCLI code paths as ``python cli.py fit/test``:

1. ``fit`` each training config (same backbone and data for all, given by ``common_args``);
2. ``test`` the best checkpoint of each with one evaluation config that adds the same attacks
   (PerturbedAccuracy) and the same certification (Certification) to every model;
3. write ``report.md`` with the comparison table, the figures, and the same scalars and figures to
   TensorBoard under ``<output_dir>/tensorboard`` (one run group: a folder per model plus
   ``comparison``).

A stage that already finished is reused when the command runs again: a training whose
``fit.json`` and checkpoint exist is not retrained, an evaluation whose ``metrics.json`` exists is
not redone, and an interrupted certification resumes from its TSV.

    python cli.py compare --config configs/mnist/compare.yaml
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import cli
from robust.certificates import read_tsv, summarize
from robust.attacks import AttackSpec, attack
from robust.report import markdown_table, plot_attack_bars, plot_certified_curves, plot_example_grid

# The seed experiment's own numbers, shown beside ours for reference.
SEED_NUMBERS = {
    "standard": {"fgm_l2_eps5": 0.097, "fgm_linf_eps0.3": 0.027},
    "adversarial": {"clean": 0.9653, "fgm_l2_eps5": 0.9459},
}


@dataclass
class Training:
    """One model of the comparison.

    Attributes:
        name: Name in the report and folder under ``output_dir``.
        config: LightningCLI config file of the training.
        args: Extra CLI arguments for this model only (e.g. ``--model.init_args.sigma 0.5``).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)


def parse(argv: list[str]):
    """Settings of the comparison (from ``--config`` YAML and flags)."""
    parser = ArgumentParser(prog="robust compare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--output_dir", type=str, default="results/mnist_compare")
    parser.add_argument("--trainings", type=list[Training], default=[])
    parser.add_argument("--common_args", type=list[str], default=[], help="CLI args for every run")
    parser.add_argument("--evaluation", type=str, help="config adding the evaluation callbacks")
    parser.add_argument("--examples", type=int, default=8, help="images in each example grid")
    settings = parser.parse_args(argv)
    if not settings.trainings:
        parser.error("trainings: give at least one {name, config} entry")
    if not settings.evaluation or not Path(settings.evaluation).is_file():
        parser.error(f"evaluation: config file {settings.evaluation!r} does not exist")
    for training in settings.trainings:
        if not Path(training.config).is_file():
            parser.error(
                f"trainings: config file {training.config!r} of {training.name} does not exist"
            )
    return settings


def run_args(settings, training: Training, out: Path) -> list[str]:
    """CLI arguments shared by the fit and test of one model."""
    return [
        "--config",
        training.config,
        *settings.common_args,
        *training.args,
        "--trainer.logger.init_args.save_dir",
        str(out / "tensorboard"),
        "--trainer.logger.init_args.name",
        training.name,
    ]


def stage_key(*parts: str) -> str:
    """Short hash of everything a stage's result depends on (file contents and arguments)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def fit(settings, training: Training, out: Path) -> dict:
    """Train one model, or reuse the training of the same config and arguments.

    Returns:
        ``{"key", "ckpt_path", "train_time_s"}``; ``key`` changes with the training config's
        contents, ``common_args`` and the model's ``args``.
    """
    key = stage_key(Path(training.config).read_text(), *settings.common_args, *training.args)
    marker = out / training.name / "fit.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key and Path(done["ckpt_path"]).is_file():
            print(f"[compare] {training.name}: reusing trained checkpoint {done['ckpt_path']}")
            return done
    print(f"[compare] {training.name}: training with {training.config}")
    checkpoints = out / training.name / "checkpoints" / key
    start = time.perf_counter()
    run = cli.main(
        ["fit", *run_args(settings, training, out), "--checkpoint.dirpath", str(checkpoints)]
    )
    done = {
        "key": key,
        "ckpt_path": run.trainer.checkpoint_callback.best_model_path
        or run.trainer.checkpoint_callback.last_model_path,
        "train_time_s": time.perf_counter() - start,
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(done, indent=2))
    return done


def evaluation_config(settings, training: Training, out: Path) -> tuple[Path, list[AttackSpec]]:
    """The evaluation config with this model's certification TSV path filled in, and its attacks."""
    config = yaml.safe_load(Path(settings.evaluation).read_text())
    attacks: list[AttackSpec] = []
    for callback in config.get("trainer", {}).get("callbacks", []):
        init_args = callback.setdefault("init_args", {})
        if callback["class_path"].endswith("Certification"):
            init_args["output"] = str(out / training.name / "certify.tsv")
        if callback["class_path"].endswith("PerturbedAccuracy"):
            attacks = [AttackSpec(**spec) for spec in init_args.get("attacks", [])]
    path = out / training.name / "evaluation.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, attacks


def evaluate(settings, training: Training, out: Path, trained: dict) -> dict:
    """Test one model with the evaluation callbacks, or reuse a finished identical evaluation.

    An evaluation of the same checkpoint with the same evaluation config is reused when finished
    and resumed (the certification TSV) when interrupted; a certification file left by another
    model or config is moved aside to ``certify.tsv.stale``.
    """
    folder = out / training.name
    marker, state = folder / "metrics.json", folder / "evaluation.json"
    eval_config, attacks = evaluation_config(settings, training, out)
    key = stage_key(
        trained["key"], trained["ckpt_path"], eval_config.read_text(), str(settings.examples)
    )
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            print(f"[compare] {training.name}: reusing evaluation {marker}")
            return done["metrics"]
    if state.is_file() and json.loads(state.read_text()).get("key") != key:
        for stale in (folder / "certify.tsv", folder / "certify.tsv.json"):
            if stale.exists():
                stale.replace(stale.with_name(stale.name + ".stale"))
    state.write_text(json.dumps({"key": key}))
    print(f"[compare] {training.name}: attacking and certifying {trained['ckpt_path']}")
    run = cli.main(
        [
            "test",
            *run_args(settings, training, out),
            "--config",
            str(eval_config),
            "--ckpt_path",
            trained["ckpt_path"],
        ]
    )
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    save_examples(run.model, run.datamodule, attacks, settings.examples, folder / "examples.npz")
    marker.write_text(json.dumps({"key": key, "metrics": metrics}, indent=2, sort_keys=True))
    return metrics


def save_examples(model, datamodule, attacks: list[AttackSpec], k: int, path: Path) -> None:
    """Attack ``k`` test images spread over the set with each attack; save images and predictions."""
    count = len(datamodule.test_set)
    chosen = np.linspace(0, count - 1, min(k, count)).round().astype(int).tolist()
    images, labels = zip(*(datamodule.test_set[i][:2] for i in chosen), strict=True)
    x = torch.stack(images).to(model.device)
    y = torch.as_tensor(labels, device=model.device)
    model.eval()
    arrays = {"clean": x.cpu().numpy(), "labels": y.cpu().numpy()}
    with torch.no_grad():
        arrays["pred/clean"] = model(x).argmax(1).cpu().numpy()
    for spec in attacks:
        generator = torch.Generator(device=x.device).manual_seed(0)
        x_adv = attack(model, x, y, spec, generator=generator)
        with torch.no_grad():
            arrays[f"pred/{spec.key}"] = model(x_adv).argmax(1).cpu().numpy()
        arrays[f"adv/{spec.key}"] = x_adv.cpu().numpy()
    np.savez_compressed(path, **arrays)


def write_report(settings, out: Path, results: dict[str, dict]) -> Path:
    """``report.md``, the PNG figures and the TensorBoard ``comparison`` run."""
    from torch.utils.tensorboard import SummaryWriter

    radii = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    attack_keys = sorted(
        {
            k.split("/", 2)[2]
            for r in results.values()
            for k in r["metrics"]
            if k.startswith("test/perturbed_acc/")
        }
    )
    curves, accuracies, table = {}, {}, []
    for name, result in results.items():
        metrics = result["metrics"]
        tsv = out / name / "certify.tsv"
        rows = read_tsv(tsv)[0] if tsv.is_file() else []
        summary = summarize(rows, radii)
        curves[name] = (np.array([r.radius for r in rows]), np.array([r.correct for r in rows]))
        accuracies[name] = {"clean": metrics.get("test/acc", float("nan"))}
        accuracies[name] |= {
            k: metrics.get(f"test/perturbed_acc/{k}", float("nan")) for k in attack_keys
        }
        table.append(
            [
                name,
                *accuracies[name].values(),
                f"{summary.get('correct_certified', 0):.0f}/{len(rows)}",
                summary.get("acr", float("nan")),
                *(summary.get(f"certified_acc@{r:g}", float("nan")) for r in radii),
                f"{result['train_time_s']:.0f}",
            ]
        )
    header = ["model", "clean acc", *(f"acc {k}" for k in attack_keys), "correct_certified", "ACR"]
    header += [f"cert acc @{r:g}" for r in radii] + ["train time (s)"]

    figures = {
        "certified_accuracy.png": plot_certified_curves(curves),
        "attack_accuracy.png": plot_attack_bars(accuracies),
    }
    for name in results:
        data = np.load(out / name / "examples.npz")
        adversarial = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("adv/")}
        predictions = {
            k.split("/", 1)[1]: data[k].tolist() for k in data.files if k.startswith("pred/")
        }
        figures[f"examples_{name}.png"] = plot_example_grid(
            data["clean"], adversarial, data["labels"].tolist(), predictions
        )
    writer = SummaryWriter(str(out / "tensorboard" / "comparison"))
    for filename, figure in figures.items():
        figure.savefig(out / filename, dpi=120)
        writer.add_figure(f"comparison/{filename.removesuffix('.png')}", figure)
    for name, row in zip(results, table, strict=True):
        for column, value in zip(header[1:], row[1:], strict=False):
            if isinstance(value, float):
                writer.add_scalar(f"comparison/{column}/{name}", value)
    writer.close()

    seed_rows = [
        [name, *(SEED_NUMBERS.get(name, {}).get(k, float("nan")) for k in ["clean", *attack_keys])]
        for name in results
    ]
    settings_text = yaml.safe_dump(
        {
            "trainings": [vars(t) for t in settings.trainings],
            "common_args": settings.common_args,
            "evaluation": yaml.safe_load(Path(settings.evaluation).read_text()),
        },
        sort_keys=False,
    )
    report = out / "report.md"
    report.write_text(
        "\n".join(
            [
                "# Robustness comparison",
                "",
                markdown_table(header, table),
                "",
                "Accuracies are fractions of the test split; `correct_certified` counts test images that"
                " randomized smoothing certifies with the correct class; ACR is the average certified L2"
                " radius (0 for wrong or abstained images); `cert acc @r` is the fraction certified"
                " correct at radius at least r.",
                "",
                "![certified accuracy](certified_accuracy.png)",
                "",
                "![accuracy under attack](attack_accuracy.png)",
                "",
                *(f"![{name} examples](examples_{name}.png)" for name in results),
                "",
                "## The seed experiment's numbers, for reference",
                "",
                markdown_table(
                    ["model", "clean acc", *(f"acc {k}" for k in attack_keys)], seed_rows
                ),
                "",
                "## Settings",
                "",
                "```yaml",
                settings_text.rstrip(),
                "```",
                "",
            ]
        )
    )
    return report


def compare(argv: list[str]) -> Path:
    """Run the whole comparison; return the path of ``report.md``."""
    settings = parse(argv)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for training in settings.trainings:
        trained = fit(settings, training, out)
        metrics = evaluate(settings, training, out, trained)
        results[training.name] = {"metrics": metrics, **trained}
    report = write_report(settings, out, results)
    print(f"[compare] report written to {report}")
    return report
