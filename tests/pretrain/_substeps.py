"""Shared by the one-code-path tests: replace a block class's sub-step by a counted, perturbed version."""


def perturb_substep(monkeypatch, cls, step: str) -> list:
    """Patch ``cls.step`` so every call is recorded (the returned list) and its output goes through
    ``y + y² / 2``: elementwise and not affine, so no following LayerNorm undoes it."""
    calls = []
    orig = getattr(cls, step)

    def patched(self, *args, **kw):
        calls.append(step)
        out = orig(self, *args, **kw)
        return out + 0.5 * out.square()

    monkeypatch.setattr(cls, step, patched)
    return calls
