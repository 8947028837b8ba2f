"""CI workaround (never shipped): PyPI's torchvision 0.28.0 is a CUDA build; on a CPU torch its import
dies in ``torchvision/_meta_registrations.py`` on two unguarded ``register_fake("torchvision::nms")`` /
``("torchvision::qnms")`` decorators (the C++ ops are not registered). Route those two decorators
through a helper that skips the registration when the op does not exist. Idempotent."""
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    sys.exit("torchvision is not installed")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
MARK = "# shplb-ci-guard"
if MARK in src:
    print(f"{path}: already guarded")
    sys.exit(0)
HELPER = f'''

def _shplb_guarded_fake(op):  {MARK}
    def deco(fn):
        try:
            return torch.library.register_fake(op)(fn)
        except RuntimeError:  # CPU torch + CUDA torchvision: the op is not registered
            return fn
    return deco

'''
n = 0
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")'
    if old in src:
        src = src.replace(old, f'@_shplb_guarded_fake("torchvision::{op}")')
        n += 1
if n == 0:
    sys.exit(f"{path}: no register_fake('torchvision::nms'/'qnms') found to guard; check the torchvision version")
# the helper goes right after the imports (before the first decorator use)
first = src.index("@")
src = src[:first] + HELPER.lstrip("\n") + "\n" + src[first:]
path.write_text(src)
print(f"{path}: guarded {n} register_fake calls")
