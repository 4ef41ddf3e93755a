"""PNG figures a user wants to look at after training."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(records: list[dict], path) -> None:
    """Training loss terms (and validation mAP, where logged) against the step."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "map" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "conf", "loc"):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("multibox loss")
    ax.set_yscale("log")
    ax.legend(loc="upper left")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["map"] for r in evals], "k.-", label="val mAP")
        ax2.set_ylabel("validation mAP")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_precision_recall(result: dict, class_names, path, *, title: str = "") -> None:
    """Each class's precision/recall curve on one axes, its AP in the legend.

    `result` is evaluate_detections' dict with return_curves=True ("ap", "map", "recall",
    "precision"). Classes without ground truth (AP NaN, no curve) are left out.
    """
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(9, 6))
    for index, (name, ap, recall, precision) in enumerate(
            zip(class_names, result["ap"], result["recall"], result["precision"])):
        if recall is not None:
            # A lone detection is a point, which a line alone would not show.
            ax.plot(recall, precision, color=colours[index % len(colours)],
                    marker="." if len(recall) == 1 else None, label=f"{name} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"mAP {result['map']:.4f}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
