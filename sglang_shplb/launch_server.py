"""``python -m sglang_shplb.launch_server --model-path M --shplb-plan P [any sglang.launch_server flag]``.

Thin: everything lives in :mod:`sglang_shplb.serving.launch`."""
import sys


def main() -> int:
    from sglang_shplb.serving.launch import main as _main
    return _main()


if __name__ == "__main__":
    sys.exit(main())
