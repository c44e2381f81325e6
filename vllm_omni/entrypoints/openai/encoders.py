"""One encoder per kind of artifact, at the API edge: images with Pillow, video as H.264 mp4
with PyAV, audio with soundfile. Each returns the file's bytes and its media type."""

from __future__ import annotations

import io

import numpy as np

from vllm_omni.engine.request import Audio, Video
from vllm_omni.utils.image import encode_image

IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16", "audio/wav"), "flac": ("FLAC", "PCM_16", "audio/flac"),
                 "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"), "pcm": ("RAW", "PCM_16", "audio/pcm")}


def _rgb8(frame) -> np.ndarray:
    """A PIL image or a float HxWxC array in [0, 1] as 8-bit RGB."""
    if isinstance(frame, np.ndarray):
        return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)[..., :3]
    return np.asarray(frame.convert("RGB"))


def encode_video(video: Video, crf: int = 18) -> tuple[bytes, str]:
    """H.264 in mp4, yuv420p (what browsers and players take); an odd side is padded by one."""
    import av
    from fractions import Fraction

    frames = [_rgb8(f) for f in video.frames]
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(video.fps).limit_denominator(1001))
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for rgb in frames:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue(), "video/mp4"


def encode_audio(audio: Audio, fmt: str = "wav") -> tuple[bytes, str]:
    """``audio.samples`` is (channels, samples) float in [-1, 1]."""
    import soundfile

    container, subtype, media_type = AUDIO_FORMATS[fmt]
    data = np.clip(np.asarray(audio.samples, dtype=np.float32), -1, 1).T
    buf = io.BytesIO()
    soundfile.write(buf, data, audio.sample_rate, format=container, subtype=subtype)
    return buf.getvalue(), media_type


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
