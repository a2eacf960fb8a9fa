"""`python -m pipelines.demo train|train-lora|evaluate|evaluate-edits|noise-scale ...`"""
import sys


def main() -> None:
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "train":
        from .train import main as run
    elif command == "train-lora":
        from .lora_train import main as run
    elif command == "evaluate":
        from .evaluate import main as run
    elif command == "evaluate-edits":
        from .evaluate_edits import main as run
    elif command == "noise-scale":
        from .noise_scale import main as run
    else:
        sys.exit("usage: python -m pipelines.demo train|train-lora|evaluate|evaluate-edits|noise-scale [options]  (--help after the command for options)")
    run(rest)


main()
