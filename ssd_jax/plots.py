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
