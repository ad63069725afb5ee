//! Noise schedules with diffusers' semantics: the scheduler config (`scheduler_config.json`), the
//! training betas, the inference timesteps for a step count, and one denoising step of the DDIM
//! (eta = 0) and Euler discrete samplers. Arithmetic is in f64; latents stay f32.

use serde::Deserialize;

use super::SchedulerKind;

/// The keys of `scheduler/scheduler_config.json` this module reads. A missing file or key takes
/// Stable Diffusion 1.x's value (not diffusers' class default): that is what a folder without a
/// scheduler config most likely holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Spacing,
    pub steps_offset: usize,
    /// DDIM: the "previous" alpha of the last step is 1 instead of `alphas_cumprod[0]`.
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted x₀ to ±`clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    // Options that change the maths in ways not implemented here: refused at load rather than
    // silently ignored.
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub interpolation_type: String,
    pub timestep_type: String,
    /// Euler: the sigma after the last step, `zero` or `sigma_min`.
    pub final_sigmas_type: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: Spacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            thresholding: false,
            rescale_betas_zero_snr: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            interpolation_type: "linear".into(),
            timestep_type: "discrete".into(),
            final_sigmas_type: "zero".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` and refuses options this module does not implement.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let unsupported = [
            ("thresholding", self.thresholding),
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("interpolation_type other than \"linear\"", self.interpolation_type != "linear"),
            ("timestep_type other than \"discrete\"", self.timestep_type != "discrete"),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!("{name} is not supported"));
        }
        if !matches!(self.final_sigmas_type.as_str(), "zero" | "sigma_min") {
            return Err(format!("final_sigmas_type {:?} is not supported", self.final_sigmas_type));
        }
        if self.num_train_timesteps < 2 {
            return Err("num_train_timesteps must be at least 2".into());
        }
        if let Some(b) = &self.trained_betas
            && (b.len() != self.num_train_timesteps || b.iter().any(|&x| !(0.0..1.0).contains(&x)))
        {
            return Err(format!(
                "trained_betas must hold num_train_timesteps ({}) values in [0, 1)",
                self.num_train_timesteps
            ));
        }
        Ok(())
    }

    /// The training noise schedule: ᾱₜ = Π (1 − βₛ) for s ≤ t.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let lin = |a: f64, b: f64| (0..n).map(move |i| a + (b - a) * i as f64 / (n - 1) as f64);
        let betas: Vec<f64> = match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => b.clone(),
            (None, BetaSchedule::Linear) => lin(self.beta_start, self.beta_end).collect(),
            (None, BetaSchedule::ScaledLinear) => {
                lin(self.beta_start.sqrt(), self.beta_end.sqrt()).map(|b| b * b).collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        betas
            .iter()
            .scan(1.0, |acc, b| {
                *acc *= 1.0 - b;
                Some(*acc)
            })
            .collect()
    }
}

/// A schedule set up for one generation: `steps` timesteps and the coefficients of each step.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: SchedulerKind,
    prediction: PredictionType,
    clip: Option<f64>,
    /// The timestep fed to the UNet at each step (fractional for Euler with linspace spacing).
    timesteps: Vec<f64>,
    /// DDIM: (ᾱₜ, ᾱ_prev) per step.
    alphas: Vec<(f64, f64)>,
    /// Euler: σ per step, plus the final σ.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl Schedule {
    pub fn new(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Result<Self, String> {
        let t_train = cfg.num_train_timesteps;
        if steps == 0 || steps > t_train {
            return Err(format!("steps must be in 1..={t_train}"));
        }
        let ac = cfg.alphas_cumprod();
        let timesteps = spaced_timesteps(cfg, kind, steps);
        let last = (t_train - 1) as f64;
        if let Some(t) = timesteps.iter().find(|&&t| !(0.0..=last).contains(&t)) {
            return Err(format!("timestep {t} is outside the {t_train} training timesteps (check steps_offset)"));
        }
        let mut schedule = Self {
            kind,
            prediction: cfg.prediction_type,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
            timesteps,
            alphas: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
        };
        match kind {
            SchedulerKind::Ddim => {
                let final_alpha = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
                let stride = (t_train / steps) as i64;
                schedule.alphas = schedule
                    .timesteps
                    .iter()
                    .map(|&t| {
                        let prev = t as i64 - stride;
                        (ac[t as usize], if prev >= 0 { ac[prev as usize] } else { final_alpha })
                    })
                    .collect();
            }
            SchedulerKind::Euler => {
                let full: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
                let interp = |t: f64| {
                    let lo = t.floor() as usize;
                    let hi = (lo + 1).min(full.len() - 1);
                    let frac = t - lo as f64;
                    full[lo] + (full[hi] - full[lo]) * frac
                };
                schedule.sigmas = schedule.timesteps.iter().map(|&t| interp(t)).collect();
                schedule.sigmas.push(if cfg.final_sigmas_type == "sigma_min" { full[0] } else { 0.0 });
                let max = schedule.sigmas.iter().copied().fold(0.0, f64::max);
                schedule.init_noise_sigma = match cfg.timestep_spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
            }
        }
        Ok(schedule)
    }

    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The standard deviation of the initial latents.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The factor the latents are multiplied by before step `i`'s UNet run (`scale_model_input`).
    pub fn input_scale(&self, i: usize) -> f64 {
        match self.kind {
            SchedulerKind::Ddim => 1.0,
            SchedulerKind::Euler => 1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt(),
        }
    }

    /// Step `i`: replaces `sample` (xₜ) with x at the next timestep, given the model's output.
    pub fn step(&self, i: usize, model_output: &[f32], sample: &mut [f32]) {
        debug_assert_eq!(model_output.len(), sample.len());
        match self.kind {
            SchedulerKind::Ddim => {
                let (a, a_prev) = self.alphas[i];
                let (sa, sb, sa_prev, sb_prev) = (a.sqrt(), (1.0 - a).sqrt(), a_prev.sqrt(), (1.0 - a_prev).sqrt());
                for (x, &out) in sample.iter_mut().zip(model_output) {
                    let (xt, out) = (f64::from(*x), f64::from(out));
                    let (mut x0, eps) = match self.prediction {
                        PredictionType::Epsilon => ((xt - sb * out) / sa, out),
                        PredictionType::VPrediction => (sa * xt - sb * out, sa * out + sb * xt),
                        PredictionType::Sample => (out, (xt - sa * out) / sb),
                    };
                    if let Some(r) = self.clip {
                        x0 = x0.clamp(-r, r);
                    }
                    *x = (sa_prev * x0 + sb_prev * eps) as f32;
                }
            }
            SchedulerKind::Euler => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let dt = next - sigma;
                let norm = (sigma * sigma + 1.0).sqrt();
                for (x, &out) in sample.iter_mut().zip(model_output) {
                    let (xt, out) = (f64::from(*x), f64::from(out));
                    let x0 = match self.prediction {
                        PredictionType::Epsilon => xt - sigma * out,
                        PredictionType::VPrediction => out * (-sigma / norm) + xt / (sigma * sigma + 1.0),
                        PredictionType::Sample => out,
                    };
                    let derivative = (xt - x0) / sigma;
                    *x = (xt + derivative * dt) as f32;
                }
            }
        }
    }
}

/// diffusers' `set_timesteps`: DDIM rounds to integers; Euler keeps linspace's fractions.
fn spaced_timesteps(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Vec<f64> {
    let t_train = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        Spacing::Linspace => {
            let last = (t_train - 1) as f64;
            let at = |i: usize| if steps == 1 { 0.0 } else { last * i as f64 / (steps - 1) as f64 };
            (0..steps)
                .rev()
                .map(|i| match kind {
                    SchedulerKind::Ddim => round_half_even(at(i)),
                    SchedulerKind::Euler => at(i),
                })
                .collect()
        }
        Spacing::Leading => {
            let ratio = t_train / steps;
            (0..steps).rev().map(|i| (i * ratio + cfg.steps_offset) as f64).collect()
        }
        Spacing::Trailing => {
            // np.arange(T, 0, -T/n) has n elements T − k·T/n; rounded, minus one.
            let ratio = t_train as f64 / steps as f64;
            (0..steps).map(|k| round_half_even(t_train as f64 - k as f64 * ratio) - 1.0).collect()
        }
    }
}

/// numpy's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r }
}

#[cfg(test)]
mod tests {
    //! Expected values come from `reference.py` (an independent numpy version of diffusers'
    //! formulas), run once and pasted here.
    use super::*;

    fn close(actual: f64, expected: f64, what: &str) {
        let tol = 1e-5 * expected.abs().max(1e-3);
        assert!((actual - expected).abs() <= tol, "{what}: {actual} vs reference {expected}");
    }

    fn close_all(actual: &[f64], expected: &[f64], what: &str) {
        assert_eq!(actual.len(), expected.len(), "{what}: length");
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            close(*a, *e, &format!("{what}[{i}]"));
        }
    }

    fn sd() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    fn with(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json).expect("valid config")
    }

    #[test]
    fn betas_match_reference() {
        let ac = sd().alphas_cumprod();
        close_all(
            &[ac[0], ac[1], ac[500], ac[999]],
            &[0.99915, 0.9982960278384514, 0.2763326838229746, 0.004660098513077238],
            "scaled_linear ᾱ",
        );
        let ac = with(r#"{"beta_schedule": "linear"}"#).alphas_cumprod();
        close_all(&[ac[0], ac[500], ac[999]], &[0.99915, 0.160771599870189, 0.0015789629305514416], "linear ᾱ");
        let full = |t: usize| ((1.0 - sd().alphas_cumprod()[t]) / sd().alphas_cumprod()[t]).sqrt();
        close(full(999), 14.614641229333639, "SD sigma_max");
        close(full(0), 0.029167158151720367, "SD sigma_min");
    }

    #[test]
    fn ddim_timesteps_match_reference() {
        let ts = |cfg: &SchedulerConfig, n| {
            Schedule::new(cfg, SchedulerKind::Ddim, n)
                .expect("schedule")
                .timesteps()
                .iter()
                .map(|&t| t as i64)
                .collect::<Vec<_>>()
        };
        let leading_50: Vec<i64> = (0..50).rev().map(|i| 20 * i + 1).collect();
        assert_eq!(ts(&sd(), 50), leading_50);
        assert_eq!(ts(&sd(), 50)[..3], [981, 961, 941]);
        assert_eq!(
            ts(&with(r#"{"timestep_spacing": "linspace"}"#), 10),
            [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
        assert_eq!(
            ts(&with(r#"{"timestep_spacing": "trailing"}"#), 10),
            [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(ts(&with(r#"{"timestep_spacing": "trailing"}"#), 7), [999, 856, 713, 570, 428, 285, 142]);
        assert_eq!(ts(&with(r#"{"steps_offset": 0}"#), 7), [852, 710, 568, 426, 284, 142, 0]);
    }

    #[test]
    fn euler_sigmas_match_reference() {
        let s = Schedule::new(&sd(), SchedulerKind::Euler, 50).expect("schedule");
        close(s.sigmas[0], 13.120410742553977, "leading 50 σ[0]");
        close(s.sigmas[49], 0.04131441199678309, "leading 50 σ[49]");
        assert_eq!(s.sigmas[50], 0.0);
        close(s.init_noise_sigma(), 13.158464122127848, "leading 50 init_noise_sigma");
        close(s.input_scale(0), 1.0 / (13.120410742553977f64.powi(2) + 1.0).sqrt(), "scale_model_input");

        let s = Schedule::new(&with(r#"{"timestep_spacing": "linspace"}"#), SchedulerKind::Euler, 7).expect("schedule");
        close_all(s.timesteps(), &[999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0], "linspace 7 timesteps");
        close_all(
            &s.sigmas,
            &[
                14.614641229333639,
                5.948916172611938,
                2.9183071154268285,
                1.6155825101612464,
                0.9323579668348474,
                0.49355304576156867,
                0.029167158151720367,
                0.0,
            ],
            "linspace 7 σ",
        );
        close(s.init_noise_sigma(), 14.614641229333639, "linspace init_noise_sigma = σ_max");

        let s =
            Schedule::new(&with(r#"{"timestep_spacing": "trailing"}"#), SchedulerKind::Euler, 10).expect("schedule");
        close_all(s.timesteps(), &[999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0], "trailing 10");
    }

    /// The reference's toy model: 0.5·sin(x) + t/1000, elementwise.
    fn run(cfg: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Vec<f64> {
        let s = Schedule::new(cfg, kind, steps).expect("schedule");
        let x0 = [-1.5f64, 0.3, 2.0, 0.0, 0.75];
        let mut x: Vec<f32> = x0.iter().map(|v| (v * s.init_noise_sigma()) as f32).collect();
        for (i, &t) in s.timesteps().iter().enumerate() {
            let scale = s.input_scale(i);
            let out: Vec<f32> = x.iter().map(|&v| (0.5 * (f64::from(v) * scale).sin() + t / 1000.0) as f32).collect();
            s.step(i, &out, &mut x);
        }
        x.into_iter().map(f64::from).collect()
    }

    #[test]
    fn euler_trajectories_match_reference() {
        close_all(
            &run(&sd(), SchedulerKind::Euler, 10),
            &[-17.007074706890364, -2.529363708142293, 8.819116590655321, -4.76211615308932, -0.7535092803446428],
            "euler leading 10 epsilon",
        );
        close_all(
            &run(&with(r#"{"timestep_spacing": "linspace"}"#), SchedulerKind::Euler, 7),
            &[-32.438467805792854, -7.916295466087562, 12.689848026584066, -11.247941480726123, -3.3925653074499293],
            "euler linspace 7 epsilon",
        );
        close_all(
            &run(
                &with(r#"{"timestep_spacing": "trailing", "prediction_type": "v_prediction"}"#),
                SchedulerKind::Euler,
                10,
            ),
            &[-1.179895056519123, -0.23339954785886086, 0.5700642245306697, -0.35352806562532413, -0.05462010862793526],
            "euler trailing 10 v_prediction",
        );
    }

    #[test]
    fn ddim_trajectories_match_reference() {
        close_all(
            &run(&sd(), SchedulerKind::Ddim, 10),
            &[-16.985915380474392, -2.5365231164568507, 8.823645367424927, -4.7454898418845195, -0.7632777916729508],
            "ddim leading 10 epsilon",
        );
        close_all(
            &run(&with(r#"{"set_alpha_to_one": true}"#), SchedulerKind::Ddim, 10),
            &[-17.007074706890357, -2.5293637081422933, 8.819116590655323, -4.7621161530893215, -0.7535092803446433],
            "ddim leading 10 epsilon set_alpha_to_one",
        );
        close_all(
            &run(
                &with(r#"{"timestep_spacing": "trailing", "prediction_type": "v_prediction"}"#),
                SchedulerKind::Ddim,
                10,
            ),
            &[
                -1.2061480420926185,
                -0.23619203601235875,
                0.5922998925875308,
                -0.35995399001244405,
                -0.05180401482053294,
            ],
            "ddim trailing 10 v_prediction",
        );
    }

    #[test]
    fn sd_scheduler_config_parses_and_unsupported_options_are_refused() {
        let sd_json = r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;
        assert_eq!(with(sd_json), sd());
        assert_eq!(with("{}"), sd());
        let err = SchedulerConfig::from_json(r#"{"use_karras_sigmas": true}"#).expect_err("karras is not implemented");
        assert!(err.contains("use_karras_sigmas"), "{err}");
        let err = SchedulerConfig::from_json(r#"{"prediction_type": "flow"}"#).expect_err("unknown prediction type");
        assert!(err.contains("flow"), "{err}");
        assert!(Schedule::new(&sd(), SchedulerKind::Ddim, 0).is_err());
    }

    #[test]
    fn numpy_rounding() {
        assert_eq!([0.5, 1.5, 2.5, 832.5, 2.4, -0.5].map(round_half_even), [0.0, 2.0, 2.0, 832.0, 2.0, -0.0]);
    }
}
