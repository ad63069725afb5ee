"""Independent numpy re-implementation of the diffusers scheduler formulas (DDIMScheduler,
EulerDiscreteScheduler) that the Rust unit tests in scheduler.rs are checked against.

Not part of the build. Run once with `python3 reference.py` (needs numpy) and paste the printed
values into the tests; everything is computed in float64.
"""
import numpy as np

np.set_printoptions(precision=17)
repr = lambda v: float(v)  # plain floats, shortest round-trip form
T = 1000


def betas(schedule="scaled_linear", start=0.00085, end=0.012):
    if schedule == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    raise ValueError(schedule)


def alphas_cumprod(schedule="scaled_linear"):
    return np.cumprod(1.0 - betas(schedule))


def ddim_timesteps(n, spacing="leading", offset=1):
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + offset
    if spacing == "trailing":
        ratio = T / n
        return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1
    raise ValueError(spacing)


def euler_timesteps(n, spacing="leading", offset=1):
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        ratio = T / n
        return np.arange(T, 0, -ratio).round() - 1.0
    raise ValueError(spacing)


def euler_sigmas(ts, ac):
    full = ((1 - ac) / ac) ** 0.5
    s = np.interp(ts, np.arange(0, len(full)), full)
    return np.concatenate([s, [0.0]])


def euler_init_sigma(sigmas, spacing):
    m = sigmas.max()
    return m if spacing in ("linspace", "trailing") else (m**2 + 1) ** 0.5


def toy_eps(x, t):
    return 0.5 * np.sin(x) + t / 1000.0


X0 = np.array([-1.5, 0.3, 2.0, 0.0, 0.75])


def run_euler(n, spacing, pred, offset=1):
    ac = alphas_cumprod()
    ts = euler_timesteps(n, spacing, offset)
    sig = euler_sigmas(ts, ac)
    x = X0 * euler_init_sigma(sig, spacing)
    for i, t in enumerate(ts):
        s = sig[i]
        out = toy_eps(x / (s**2 + 1) ** 0.5, t)
        if pred == "epsilon":
            x0 = x - s * out
        else:  # v_prediction
            x0 = out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)
        d = (x - x0) / s
        x = x + d * (sig[i + 1] - s)
    return x


def run_ddim(n, spacing, pred, set_alpha_to_one=False, offset=1):
    ac = alphas_cumprod()
    final = 1.0 if set_alpha_to_one else ac[0]
    ts = ddim_timesteps(n, spacing, offset)
    x = X0.copy()
    for t in ts:
        out = toy_eps(x, t)
        prev = t - T // n
        a = ac[t]
        ap = ac[prev] if prev >= 0 else final
        b = 1 - a
        if pred == "epsilon":
            x0 = (x - b**0.5 * out) / a**0.5
            eps = out
        else:
            x0 = a**0.5 * x - b**0.5 * out
            eps = a**0.5 * out + b**0.5 * x
        x = ap**0.5 * x0 + (1 - ap) ** 0.5 * eps
    return x


ac = alphas_cumprod()
full_sigmas = ((1 - ac) / ac) ** 0.5
print("sd sigma_max", repr(full_sigmas[-1]), "sigma_min", repr(full_sigmas[0]))
print("alphas_cumprod scaled_linear [0, 1, 500, 999]", [repr(ac[i]) for i in (0, 1, 500, 999)])
acl = alphas_cumprod("linear")
print("alphas_cumprod linear [0, 500, 999]", [repr(acl[i]) for i in (0, 500, 999)])
print("ddim leading 50", list(int(t) for t in ddim_timesteps(50)))
print("ddim linspace 10", list(int(t) for t in ddim_timesteps(10, "linspace")))
print("ddim trailing 10", list(int(t) for t in ddim_timesteps(10, "trailing")))
print("ddim trailing 7", list(int(t) for t in ddim_timesteps(7, "trailing")))
print("ddim leading 7 offset 0", list(int(t) for t in ddim_timesteps(7, "leading", 0)))
ts = euler_timesteps(50)
sig = euler_sigmas(ts, ac)
print("euler leading 50 sigma[0]", repr(sig[0]), "sigma[49]", repr(sig[49]), "init", repr(euler_init_sigma(sig, "leading")))
ts = euler_timesteps(7, "linspace")
sig = euler_sigmas(ts, ac)
print("euler linspace 7 timesteps", [repr(t) for t in ts])
print("euler linspace 7 sigmas", [repr(s) for s in sig])
print("euler linspace 7 init", repr(euler_init_sigma(sig, "linspace")))
print("euler trailing 10 timesteps", [repr(t) for t in euler_timesteps(10, "trailing")])
for name, v in [
    ("euler leading 10 epsilon", run_euler(10, "leading", "epsilon")),
    ("euler linspace 7 epsilon", run_euler(7, "linspace", "epsilon")),
    ("euler trailing 10 v_prediction", run_euler(10, "trailing", "v_prediction")),
    ("ddim leading 10 epsilon", run_ddim(10, "leading", "epsilon")),
    ("ddim leading 10 epsilon set_alpha_to_one", run_ddim(10, "leading", "epsilon", True)),
    ("ddim trailing 10 v_prediction", run_ddim(10, "trailing", "v_prediction")),
]:
    print(name, [repr(x) for x in v])

# The 4-step schedules of the closed-form pipeline test (SD 1.x config: leading, offset 1).
ts = ddim_timesteps(4)
print("closed-form ddim 4: timesteps", list(float(t) for t in ts), "alpha_t", [repr(ac[t]) for t in ts],
      "alpha_prev", [repr(ac[t - 250]) if t - 250 >= 0 else repr(ac[0]) for t in ts])
ts = euler_timesteps(4)
sig = euler_sigmas(ts, ac)
print("closed-form euler 4: timesteps", list(float(t) for t in ts), "sigmas", [repr(s) for s in sig], "init", repr(euler_init_sigma(sig, "leading")))
