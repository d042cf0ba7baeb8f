"""Synthetic sleep recordings, for tests and smoke runs ONLY.

Everything made here is marked ``synthetic=True`` and must never be reported as a result on real
data. The point is that code paths are identical to real data (a :class:`~sleeplib.data.raw.RawNight`
with Sleep-Cassette channel names and rates goes through the same :func:`~sleeplib.data.prepare.epoch_night`)
and that a model can learn something, so smoke runs exercise training meaningfully.

What is simulated
-----------------
* A hypnogram: wake before sleep onset and after the final awakening, 2-5 NREM/REM cycles with
  N3 concentrated in the early cycles and REM lengthening towards the morning, plus Markov
  fragmentation (brief awakenings, N1/N2 and N2/N3 flips) and rare movement epochs.
* EEG (``EEG Fpz-Cz``, ``EEG Pz-Oz`` at 100 Hz): 1/f background plus stage-typical rhythms - alpha
  (8-12 Hz) in W (strongest occipitally), theta (4-7 Hz) in N1 and REM, sleep spindles (12-15 Hz,
  0.5-2 s) and K-complexes in N2, high-amplitude delta (0.5-2 Hz) in N3, sawtooth waves (2-3 Hz) in REM.
* EOG (``EOG horizontal``, 100 Hz): rapid eye movements in REM, blinks and saccades in W, slow
  rolling movements in N1, frontal EEG cross-talk.
* EMG (``EMG submental``, 1 Hz envelope as in Sleep-Cassette): tone highest in W, lowest in REM
  (with brief twitches).
* Subject traits (amplitude, alpha frequency and strength) are seeded by the subject only, so the
  two nights of one subject resemble each other more than nights of different subjects.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import pandas as pd

from sleeplib.data.raw import RawNight, annotations_frame

__all__ = [
    "DEFAULT_N_EPOCHS",
    "SYNTHETIC_CHANNELS",
    "synthetic_record",
    "synthetic_hypnogram",
    "synthetic_night",
]

DEFAULT_N_EPOCHS = 300
"""Epochs of a default synthetic night (2.5 h): short, so smoke runs stay fast."""

SYNTHETIC_CHANNELS = {"EEG Fpz-Cz": 100.0, "EEG Pz-Oz": 100.0, "EOG horizontal": 100.0, "EMG submental": 1.0}
"""Channel -> sampling rate, as in Sleep-Cassette."""

EPOCH_S = 30

# Per-stage amplitudes (microvolts, RMS of each component) for W, 1, 2, 3, 4, R, M.
_STAGE_ORDER = ("W", "1", "2", "3", "4", "R", "M")
_AMPLITUDE = {
    #            W     1     2     3     4     R     M
    "alpha": (10.0, 4.0, 2.0, 1.5, 1.5, 3.0, 8.0),
    "theta": (3.0, 10.0, 5.0, 4.0, 4.0, 8.0, 5.0),
    "delta": (4.0, 6.0, 14.0, 40.0, 55.0, 6.0, 10.0),
    "background": (9.0, 8.0, 9.0, 10.0, 10.0, 8.0, 25.0),
    "emg": (4.0, 2.4, 1.9, 1.7, 1.6, 0.45, 8.0),
}
# Mean events per 30-s epoch.
_RATE = {
    "spindle": (0.0, 0.2, 2.5, 0.8, 0.4, 0.0, 0.0),
    "kcomplex": (0.0, 0.1, 1.0, 0.3, 0.1, 0.0, 0.0),
    "sawtooth": (0.0, 0.1, 0.0, 0.0, 0.0, 1.2, 0.0),
    "rem": (1.2, 0.2, 0.0, 0.0, 0.0, 4.0, 2.0),
    "blink": (2.0, 0.2, 0.0, 0.0, 0.0, 0.0, 1.0),
}


def synthetic_record(subject: int, night: int) -> str:
    """Record name of a synthetic night, e.g. ``SYN031`` for subject 3, night 1."""
    return f"SYN{int(subject):02d}{int(night)}"


def synthetic_hypnogram(n_epochs: int = DEFAULT_N_EPOCHS, seed=None) -> np.ndarray:
    """A plausible night of R&K stages (one per 30-s epoch).

    Parameters
    ----------
    n_epochs : int
        Length of the night in epochs (>= 40).
    seed : int or numpy.random.Generator, optional
        Randomness.

    Returns
    -------
    numpy.ndarray of str
        R&K codes ``'W','1','2','3','4','R','M'``.
    """
    if n_epochs < 40:
        raise ValueError(f"n_epochs={n_epochs} is too short for a night with sleep cycles; use >= 40")
    rng = np.random.default_rng(seed)
    pre = int(round(n_epochs * rng.uniform(0.08, 0.12)))
    post = int(round(n_epochs * rng.uniform(0.05, 0.09)))
    sleep_len = n_epochs - pre - post
    n_cycles = int(np.clip(round(sleep_len / 85), 2, 5))
    cycle_bounds = np.linspace(0, sleep_len, n_cycles + 1).round().astype(int)
    sleep: list[str] = []
    for c in range(n_cycles):
        length = cycle_bounds[c + 1] - cycle_bounds[c]
        depth = max(1.6 - 0.45 * c, 0.15)  # slow-wave sleep fades across the night
        rem = min(0.5 + 0.35 * c, 1.6)  # REM lengthens towards the morning
        parts = [("1", 0.07), ("2", 0.22), ("3", 0.07 * depth), ("4", 0.10 * depth), ("2", 0.22), ("R", 0.17 * rem)]
        weights = np.array([w for _, w in parts]) * rng.uniform(0.7, 1.3, len(parts))
        counts = np.floor(weights / weights.sum() * length).astype(int)
        counts[1] += length - counts.sum()
        for (stage, _), count in zip(parts, counts):
            sleep += [stage] * int(count)
    stages = np.array(["W"] * pre + sleep + ["W"] * post, dtype=object)

    # Markov fragmentation inside the sleep period: neighbours of each stage, with flip probabilities.
    flips = {"1": (("W", "2"), 0.15), "2": (("1", "3", "W"), 0.06), "3": (("2", "4"), 0.15),
             "4": (("3",), 0.12), "R": (("1", "W", "2"), 0.05)}
    i = pre
    while i < pre + sleep_len:
        options, p = flips.get(stages[i], ((), 0.0))
        if options and rng.random() < p:
            run = int(rng.integers(1, 4))
            stages[i: min(i + run, pre + sleep_len)] = options[rng.integers(len(options))]
            i += run
        else:
            i += 1
    moves = rng.random(n_epochs) < 0.004
    stages[moves] = "M"
    return stages


def _shaped_noise(rng: np.random.Generator, n: int, fs: float, shape) -> np.ndarray:
    """Unit-RMS real noise whose amplitude spectrum is ``shape(freqs)``, made in the frequency domain.

    Built as complex64 and normalised by Parseval's theorem (no pass over the time series), because
    generation speed matters: CI smoke runs make whole cohorts.
    """
    freqs = np.fft.rfftfreq(n, 1 / fs).astype(np.float32)
    scale = shape(freqs).astype(np.float32)
    scale[0] = 0.0  # zero mean
    if n % 2 == 0:
        scale[-1] = 0.0  # keep the Nyquist bin out so Parseval below is exact
    used = np.flatnonzero(scale)
    values = rng.standard_normal((2, used.size), dtype=np.float32)
    spectrum = np.zeros(freqs.size, dtype=np.complex64)
    spectrum[used] = (values[0] + 1j * values[1]) * scale[used]
    rms = np.sqrt(2.0 * np.sum(np.abs(spectrum[used]) ** 2, dtype=np.float64)) / n
    # numpy's FFT (float32 in numpy >= 2): importing scipy.fft would cost more than the transform
    return np.fft.irfft(spectrum / np.float32(rms), n=n)


def _band_noise(rng: np.random.Generator, n: int, fs: float, lo: float, hi: float) -> np.ndarray:
    """Unit-RMS noise band-limited to ``[lo, hi]`` Hz."""
    return _shaped_noise(rng, n, fs, lambda f: ((f >= lo) & (f <= hi)).astype(np.float32))


def _pink_noise(rng: np.random.Generator, n: int, fs: float, exponent: float = 1.0) -> np.ndarray:
    """Unit-RMS noise with a ``1/f**exponent`` power spectrum (flat below 0.3 Hz)."""
    return _shaped_noise(rng, n, fs, lambda f: 1 / np.maximum(f, 0.3) ** (exponent / 2))


def _per_sample(values_per_epoch: np.ndarray, samples_per_epoch: int) -> np.ndarray:
    """Repeat per-epoch amplitudes to samples (stages are scored per epoch, so steps are faithful)."""
    return np.repeat(np.asarray(values_per_epoch, dtype=np.float32), samples_per_epoch)


def _add_events(target: np.ndarray, rng, stage_idx, rate_per_epoch, fs, make_wave) -> None:
    """Add Poisson-many waveforms per epoch at random positions (in place)."""
    n_per_epoch = int(EPOCH_S * fs)
    counts = rng.poisson(np.asarray(rate_per_epoch)[stage_idx])
    for epoch in np.flatnonzero(counts):
        for _ in range(counts[epoch]):
            wave = make_wave(rng)
            start = epoch * n_per_epoch + int(rng.integers(0, n_per_epoch))
            stop = min(start + len(wave), len(target))
            target[start:stop] += wave[: stop - start]


class _Components:
    """Lazily generated signal components of one night, each from its own random stream.

    Separate streams (seeded by the night's seed and the component's name) make every component
    independent of which others are generated, so ``EEG Fpz-Cz`` is the same whether or not the
    EOG is requested, and asking for fewer channels is faster.
    """

    def __init__(self, seed: int, stages: np.ndarray, fs: float, alpha_centre: float):
        self.seed, self.fs, self.alpha_centre = seed, fs, alpha_centre
        self.stage_idx = np.array([_STAGE_ORDER.index(s) for s in stages])
        self.spe = int(round(EPOCH_S * fs))
        self.n = len(stages) * self.spe
        self.cache: dict[str, np.ndarray] = {}

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def amp(self, kind: str, name: str) -> np.ndarray:
        jitter = self.rng("amp-" + name).lognormal(0, 0.15, len(self.stage_idx))
        return _per_sample(np.asarray(_AMPLITUDE[kind])[self.stage_idx] * jitter, self.spe)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self._make(name)
        return self.cache[name]

    def _make(self, name: str) -> np.ndarray:
        fs, n, rng = self.fs, self.n, self.rng(name)
        kind = name.rstrip("0123456789")
        if kind == "alpha":
            return _band_noise(rng, n, fs, self.alpha_centre - 1.5, self.alpha_centre + 1.5) * self.amp(kind, name)
        if kind == "theta":
            return _band_noise(rng, n, fs, 4.0, 7.0) * self.amp(kind, name)
        if kind == "delta":
            return _band_noise(rng, n, fs, 0.5, 2.0) * self.amp(kind, name)
        if kind == "background":
            return _pink_noise(rng, n, fs) * self.amp(kind, name)
        if kind == "rolling":  # slow rolling eye movements of drowsiness (N1)
            return _band_noise(rng, n, fs, 0.15, 0.5) * _per_sample((self.stage_idx == 1) * 30.0, self.spe)
        events = np.zeros(n, dtype=np.float32)
        _add_events(events, rng, self.stage_idx, _RATE[kind], fs, getattr(self, "_" + kind))
        return events

    # event waveforms -------------------------------------------------------------------------
    def _spindle(self, r):
        dur = r.uniform(0.5, 2.0)
        t = np.arange(int(dur * self.fs)) / self.fs
        envelope = np.sin(np.pi * t / dur) ** 2
        return r.uniform(12, 28) * envelope * np.sin(2 * np.pi * r.uniform(12, 15) * t + r.uniform(0, 2 * np.pi))

    def _kcomplex(self, r):
        t = np.arange(int(1.5 * self.fs)) / self.fs
        # sharp negative deflection followed by a slower positive one
        return r.uniform(60, 120) * (-np.exp(-((t - 0.3) / 0.1) ** 2) + 0.55 * np.exp(-((t - 0.75) / 0.2) ** 2))

    def _sawtooth(self, r):
        dur, freq, width = r.uniform(2, 5), r.uniform(2, 3), 0.8
        t = np.arange(int(dur * self.fs)) / self.fs
        phase = (freq * t) % 1.0
        # slow rise, fast fall (numpy, not scipy.signal.sawtooth: importing scipy.signal costs seconds)
        wave = np.where(phase < width, 2 * phase / width - 1, 1 - 2 * (phase - width) / (1 - width))
        return r.uniform(15, 30) * wave * np.hanning(t.size)

    def _rem(self, r):
        # a saccade: fast step that relaxes back
        t = np.arange(int(1.5 * self.fs)) / self.fs
        return r.choice([-1, 1]) * r.uniform(60, 150) * (1 - np.exp(-t / 0.03)) * np.exp(-t / 0.6)

    def _blink(self, r):
        t = np.arange(int(1.5 * self.fs)) / self.fs
        return r.uniform(80, 200) * np.exp(-((t - 0.2) / 0.08) ** 2)


def synthetic_night(
    n_epochs: int = DEFAULT_N_EPOCHS,
    seed: int | None = None,
    subject: int = 0,
    night: int = 1,
    fs: float = 100.0,
    channels: Sequence[str] | None = None,
) -> RawNight:
    """Generate one synthetic night (signals in microvolts, R&K annotations), ``synthetic=True``.

    Parameters
    ----------
    n_epochs : int
        Length in 30-s epochs (default 300 = 2.5 h).
    seed : int, optional
        Seed of the night; defaults to ``1000 * subject + night`` so every night is repeatable.
    subject, night : int
        Ids stored in the result; ``subject`` also seeds the subject's traits.
    fs : float
        Rate of the EEG and EOG channels (EMG is a 1-Hz envelope as in Sleep-Cassette).
    channels : sequence of str, optional
        Subset of :data:`SYNTHETIC_CHANNELS` to generate (default all); a channel's signal does not
        depend on which others are generated.

    Returns
    -------
    RawNight
        Channels ``EEG Fpz-Cz``, ``EEG Pz-Oz``, ``EOG horizontal`` (``fs``) and ``EMG submental`` (1 Hz).
    """
    channels = list(SYNTHETIC_CHANNELS) if channels is None else ([channels] if isinstance(channels, str) else list(channels))
    unknown = [ch for ch in channels if ch not in SYNTHETIC_CHANNELS]
    if unknown:
        raise ValueError(f"synthetic nights have no channel(s) {unknown}; available: {list(SYNTHETIC_CHANNELS)}")
    seed = 1000 * int(subject) + int(night) if seed is None else int(seed)
    traits = np.random.default_rng([int(subject), 7])  # the same person on every night
    gain = traits.uniform(0.8, 1.25)
    alpha_centre = traits.uniform(9.0, 11.0)
    alpha_gain = traits.uniform(0.7, 1.4)
    emg_gain = traits.uniform(0.8, 1.2)

    stages = synthetic_hypnogram(n_epochs, np.random.default_rng([seed, 11]))
    c = _Components(seed, stages, fs, alpha_centre)

    def fpz():
        return gain * (0.6 * alpha_gain * c["alpha0"] + c["theta0"] + c["delta0"] + c["background0"]
                       + c["spindle"] + c["kcomplex"] + c["sawtooth"])

    def pz():
        # alpha is occipital, K-complexes frontal; spindles are central and reach both derivations
        return gain * (1.4 * alpha_gain * c["alpha0"] + c["theta1"] + 0.7 * c["delta0"] + 0.4 * c["delta1"]
                       + c["background1"] + 0.6 * c["spindle"] + 0.5 * c["kcomplex"] + 0.6 * c["sawtooth"])

    def eog():
        # frontal EEG cross-talk plus eye movements: saccades (REM, W), blinks (W), slow rolling (N1)
        return gain * (0.3 * fpz_signal() + 0.4 * c["delta0"] + 0.8 * c["background2"]
                       + c["rem"] + c["blink"] + c["rolling"])

    fpz_cache: list[np.ndarray] = []

    def fpz_signal():
        if not fpz_cache:
            fpz_cache.append(fpz())
        return fpz_cache[0]

    def emg():
        # 1-Hz envelope: tone by stage with multiplicative jitter, brief twitches in REM
        r = c.rng("emg")
        level = np.repeat(np.asarray(_AMPLITUDE["emg"])[c.stage_idx], EPOCH_S) * emg_gain
        out = level * r.lognormal(0, 0.25, level.size)
        twitches = np.repeat(stages == "R", EPOCH_S) & (r.random(level.size) < 0.03)
        out[twitches] += r.uniform(1.5, 4.0, int(twitches.sum()))
        return out

    makers = {"EEG Fpz-Cz": fpz_signal, "EEG Pz-Oz": pz, "EOG horizontal": eog, "EMG submental": emg}
    signals = {ch: np.asarray(makers[ch](), dtype=np.float64) for ch in channels}
    sfreq = {ch: (1.0 if ch == "EMG submental" else float(fs)) for ch in channels}

    runs = np.flatnonzero(np.r_[True, stages[1:] != stages[:-1]])
    durations = np.diff(np.r_[runs, n_epochs]) * EPOCH_S
    annotations = annotations_frame(runs * EPOCH_S, durations, stages[runs])
    return RawNight(
        record=synthetic_record(subject, night), subject=int(subject), night=int(night), dataset="synthetic",
        signals=signals, sfreq=sfreq, annotations=annotations, synthetic=True,
        meta={"generator": "sleeplib.data.synthetic", "seed": seed, "n_epochs": n_epochs},
    )


def stage_table(raw: RawNight) -> pd.DataFrame:
    """Epochs per R&K stage of a night's annotations (a quick look at a synthetic hypnogram)."""
    counts = (raw.annotations.assign(epochs=raw.annotations["duration"] / EPOCH_S)
              .groupby("stage")["epochs"].sum().astype(int))
    return counts.to_frame("epochs")
