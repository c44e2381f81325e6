"""One encoder per kind of artifact, at the API edge: images with Pillow, video as H.264 mp4
with PyAV, audio with soundfile (Opus with PyAV). Each returns the file's bytes and its media
type."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

from vllm_omni.engine.request import Audio, Video
from vllm_omni.utils.image import encode_image

IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# soundfile's (container, subtype) for each response_format, and its media type. pcm is raw
# 16-bit little-endian, channels interleaved (the response headers give rate and channels).
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16", "audio/wav"), "flac": ("FLAC", "PCM_16", "audio/flac"),
                 "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
                 "pcm": ("RAW", "PCM_16", "audio/pcm"), "opus": (None, None, "audio/opus")}
# Opus codes 48 kHz (libsndfile's Opus takes only 8-48 kHz divisors; 44.1 kHz is not one).
OPUS_RATE = 48000


def _rgb8(frame) -> np.ndarray:
    """A PIL image or a float HxWxC array in [0, 1] as 8-bit RGB."""
    if isinstance(frame, np.ndarray):
        return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)[..., :3]
    return np.asarray(frame.convert("RGB"))


def encode_video(video: Video) -> tuple[bytes, str]:
    """H.264 in mp4, yuv420p (what browsers and players take); an odd side is padded by one."""
    import av

    frames = [_rgb8(f) for f in video.frames]
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(video.fps).limit_denominator(1001))
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        # x264's "veryfast" encodes 2-3x faster than its default ("medium") at the same
        # quality (crf); the file is up to ~20% larger. A client waits for the encode, and
        # keeps the file, so latency wins.
        stream.options = {"crf": "18", "preset": "veryfast"}
        for rgb in frames:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue(), "video/mp4"


def encode_audio(audio: Audio, fmt: str = "wav") -> tuple[bytes, str]:
    """``audio.samples`` is (channels, samples) float in [-1, 1], at the model's rate."""
    import soundfile

    container, subtype, media_type = AUDIO_FORMATS[fmt]
    data = np.clip(np.asarray(audio.samples, dtype=np.float32), -1, 1)
    if fmt == "opus":
        return _encode_opus(data, audio.sample_rate), media_type
    buf = io.BytesIO()
    soundfile.write(buf, data.T, audio.sample_rate, format=container, subtype=subtype)
    return buf.getvalue(), media_type


def _encode_opus(data: np.ndarray, rate: int) -> bytes:
    """Ogg Opus at 48 kHz, resampled by PyAV (libswresample)."""
    import av

    layout = {1: "mono", 2: "stereo"}.get(data.shape[0])
    if layout is None:
        raise ValueError(f"opus output takes mono or stereo audio, not {data.shape[0]} channels")
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=OPUS_RATE, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="fltp",
                                           layout=layout)
        # With a timestamp the muxer's granule positions exclude the encoder's pre-skip, so
        # decoders trim it and the clip keeps its length.
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        resampler = av.AudioResampler(format="flt", layout=layout, rate=OPUS_RATE)
        for chunk in [*resampler.resample(frame), *resampler.resample(None), None]:
            out.mux(stream.encode(chunk))
    return buf.getvalue()


def encode(artifact, fmt: str | None = None, compression: int | None = None
           ) -> tuple[bytes, str]:
    """Any artifact, by its kind (``fmt``: the image or audio format; video is mp4).
    ``compression`` (jpeg/webp quality) applies to images only."""
    if compression is not None and isinstance(artifact, (Video, Audio)):
        raise ValueError("compression applies to jpeg and webp images only")
    if isinstance(artifact, Video):
        return encode_video(artifact)
    if isinstance(artifact, Audio):
        return encode_audio(artifact, fmt or "wav")
    fmt = fmt or "png"
    return encode_image(artifact, fmt, compression), IMAGE_TYPES[fmt]
