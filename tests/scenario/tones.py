"""Test tones for media scenario tests: write a sine as a WAV file, find tones in samples.

A phone under test plays a known tone; the other phone records what it hears, and
these functions say which tones the recording holds. Pure Python (``wave``,
``array``, ``math``, ``cmath``): fast enough for a few seconds of 8 kHz audio.

- ``tone_power`` runs the Goertzel algorithm (one DFT bin) over 100 ms blocks and
  returns the share of the signal's power at one frequency: 1.0 for a clean tone,
  about 0 for a tone that is absent. G.711 (ITU-T G.711 mu-law/A-law, what PCMU and
  PCMA carry, RFC 3551 4.5.14) has a signal-to-quantisation-noise ratio near 38 dB,
  so a tone that crossed a PCMU call keeps well over 0.9 of the power.
- ``dominant_tones`` finds the strongest peaks of an averaged FFT spectrum, to say
  what a recording holds when a check fails.
"""

from __future__ import annotations

import array
import cmath
import math
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Narrowband telephony: the rate of PCMU/PCMA (RFC 3551 4.5.14).
DEFAULT_RATE: Final = 8000
#: Peak amplitude of a generated tone, as a share of 16-bit full scale (-6 dBFS):
#: loud enough to dwarf G.711 quantisation noise, far from clipping.
DEFAULT_AMPLITUDE: Final = 0.5
#: ``tone_power`` works on blocks this long; its bins are 1 / BLOCK_SECONDS = 10 Hz
#: apart, so a tone whose frequency is a multiple of 10 Hz falls exactly on a bin.
BLOCK_SECONDS: Final = 0.1
#: ``has_tone`` is true when at least this share of the power is at the frequency.
#: A tone carried by G.711 measures above 0.9; two equal tones mixed measure 0.5
#: each, so "has" means the tone dominates, not merely that it is present.
HAS_TONE_THRESHOLD: Final = 0.5
#: ``dominant_tones``' FFT size: 1024 samples, bins 7.8 Hz apart at 8 kHz.
FFT_SIZE: Final = 1024

_FULL_SCALE: Final = 32767


@dataclass(frozen=True)
class Tone:
    """A spectral peak: its frequency (Hz, the bin's centre) and its share of the power."""

    freq: float
    share: float


def sine(
    freq: float, seconds: float, rate: int = DEFAULT_RATE, amplitude: float = DEFAULT_AMPLITUDE
) -> array.array[int]:
    """Signed 16-bit samples of a sine of ``freq`` Hz lasting ``seconds``."""
    if not 0 < freq < rate / 2:
        raise ValueError(f"frequency {freq} Hz is not between 0 and {rate / 2} Hz (Nyquist)")
    if not 0 < amplitude <= 1:
        raise ValueError(f"amplitude {amplitude} is not in (0, 1]")
    peak = amplitude * _FULL_SCALE
    step = 2 * math.pi * freq / rate
    return array.array(
        "h", (round(peak * math.sin(step * n)) for n in range(round(seconds * rate)))
    )


def write_tone(
    path: Path,
    freq: float,
    seconds: float,
    rate: int = DEFAULT_RATE,
    amplitude: float = DEFAULT_AMPLITUDE,
) -> Path:
    """Write a mono signed 16-bit little-endian WAV of a sine; returns ``path``."""
    write_wav(path, sine(freq, seconds, rate, amplitude), rate)
    return path


def write_wav(path: Path, samples: array.array[int], rate: int = DEFAULT_RATE) -> None:
    """Write mono signed 16-bit samples as a WAV file (little-endian, as WAV is)."""
    data = array.array("h", samples)
    if data.itemsize != 2:
        raise ValueError("array 'h' is not 16 bits on this platform")
    if _big_endian():
        data.byteswap()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data.tobytes())


def read_wav(path: Path) -> tuple[array.array[int], int]:
    """The samples and rate of a mono signed 16-bit WAV file."""
    with wave.open(str(path), "rb") as source:
        if source.getnchannels() != 1 or source.getsampwidth() != 2:
            raise ValueError(
                f"{path}: {source.getnchannels()} channels of {source.getsampwidth() * 8} bits,"
                " expected mono 16-bit"
            )
        rate = source.getframerate()
        data = array.array("h", source.readframes(source.getnframes()))
    if _big_endian():
        data.byteswap()
    return data, rate


def goertzel_power(samples: Sequence[float], freq: float, rate: int = DEFAULT_RATE) -> float:
    """``|X(freq)|^2``: the squared magnitude of the DFT of ``samples`` at ``freq``.

    The Goertzel recurrence s[n] = x[n] + 2 cos(w) s[n-1] - s[n-2]; the power is
    s1^2 + s2^2 - 2 cos(w) s1 s2 after the last sample.
    """
    coeff = 2 * math.cos(2 * math.pi * freq / rate)
    s1 = s2 = 0.0
    for x in samples:
        s1, s2 = x + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


def tone_power(samples: Sequence[int], freq: float, rate: int = DEFAULT_RATE) -> float:
    """The share (0..1) of the power of ``samples`` that is at ``freq``.

    Over whole blocks of BLOCK_SECONDS: for a block of N samples with energy E, a
    sine exactly on a bin has 2 |X|^2 / N == E (Parseval), so the share is
    sum(2 |X_b|^2 / N) / sum(E_b). Silent blocks (before the first packet, during
    loss) weigh nothing. Pick ``freq`` a multiple of 1 / BLOCK_SECONDS (10 Hz);
    an off-bin tone leaks into neighbour bins and measures lower.
    """
    size = max(1, round(rate * BLOCK_SECONDS))
    tone = energy = 0.0
    for start in range(0, len(samples) - size + 1, size):
        block = samples[start : start + size]
        block_energy = float(sum(x * x for x in block))
        if block_energy == 0:
            continue
        energy += block_energy
        tone += 2 * goertzel_power(block, freq, rate) / size
    if energy == 0:
        return 0.0
    return min(1.0, tone / energy)


def has_tone(
    samples: Sequence[int],
    freq: float,
    rate: int = DEFAULT_RATE,
    threshold: float = HAS_TONE_THRESHOLD,
) -> bool:
    """Whether ``freq`` carries at least ``threshold`` (default 0.5) of the power."""
    return tone_power(samples, freq, rate) >= threshold


def fft(values: Sequence[complex]) -> list[complex]:
    """Radix-2 decimation-in-time FFT; ``len(values)`` must be a power of two."""
    size = len(values)
    if size == 0 or size & (size - 1):
        raise ValueError(f"FFT size {size} is not a power of two")
    bits = size.bit_length() - 1
    out = [
        complex(values[int(format(i, f"0{bits}b")[::-1], 2) if bits else 0]) for i in range(size)
    ]
    span = 2
    while span <= size:
        twiddle = cmath.exp(-2j * math.pi / span)
        half = span // 2
        for start in range(0, size, span):
            w = 1 + 0j
            for k in range(start, start + half):
                odd = w * out[k + half]
                out[k + half] = out[k] - odd
                out[k] = out[k] + odd
                w *= twiddle
        span *= 2
    return out


def power_spectrum(samples: Sequence[int], size: int = FFT_SIZE) -> list[float]:
    """Hann-windowed power per bin (0..size/2), averaged over whole blocks of ``size``."""
    window = [0.5 - 0.5 * math.cos(2 * math.pi * n / size) for n in range(size)]
    spectrum = [0.0] * (size // 2 + 1)
    for start in range(0, len(samples) - size + 1, size):
        bins = fft([w * x for w, x in zip(window, samples[start : start + size], strict=True)])
        for k in range(len(spectrum)):
            spectrum[k] += abs(bins[k]) ** 2
    return spectrum


def dominant_tones(
    samples: Sequence[int], rate: int = DEFAULT_RATE, count: int = 3, size: int = FFT_SIZE
) -> list[Tone]:
    """The ``count`` strongest spectral peaks, strongest first.

    A peak's share is the power of its bin and two neighbours each side (a Hann
    window's main lobe) over the whole spectrum's. Frequencies are bin centres,
    ``rate / size`` apart (7.8 Hz at 8 kHz with 1024 points). Empty when the
    samples are shorter than one block or silent.
    """
    spectrum = power_spectrum(samples, size)
    total = sum(spectrum)
    if total == 0:
        return []
    peaks = [
        k
        for k in range(1, len(spectrum) - 1)
        if spectrum[k] > 0 and spectrum[k - 1] < spectrum[k] >= spectrum[k + 1]
    ]
    peaks.sort(key=lambda k: spectrum[k], reverse=True)
    return [
        Tone(k * rate / size, sum(spectrum[max(0, k - 2) : k + 3]) / total) for k in peaks[:count]
    ]


def describe(samples: Sequence[int], rate: int = DEFAULT_RATE) -> str:
    """A one-line summary for assertion messages: length, level and strongest tones."""
    seconds = len(samples) / rate
    rms = math.sqrt(sum(x * x for x in samples) / len(samples)) if samples else 0.0
    peaks = ", ".join(f"{t.freq:.0f} Hz {t.share:.2f}" for t in dominant_tones(samples, rate))
    return f"{seconds:.2f} s, rms {rms:.0f}, peaks: {peaks or 'none'}"


def _big_endian() -> bool:
    return array.array("h", [1]).tobytes() == b"\x00\x01"
