"""Media readers: the shipped files decode; sampling and resampling do what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omniquant.data import media
from omniquant.data.sets import resolve_calib_set
from omniquant.errors import DataError


@pytest.fixture(scope="module")
def mix() -> Path:
    return resolve_calib_set("omni-mix")


@pytest.mark.parametrize("name", ["doc-report.png", "chart-pie.jpg"])
def test_read_shipped_images(mix: Path, name: str):
    from PIL import Image

    image = media.read_image(mix / "images" / name)
    with Image.open(mix / "images" / name) as img:
        width, height = img.size
        expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and image.shape == (3, height, width)
    assert torch.equal(image, expected)


@pytest.mark.parametrize(
    ("name", "size", "frames"),
    [("screen-typing.mp4", (96, 128), 12), ("screen-blink.webm", (96, 96), 16)],
)
def test_read_shipped_videos(mix: Path, name: str, size: tuple[int, int], frames: int):
    clip = media.read_video(mix / "videos" / name, num_frames=4)
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape == (4, 3, *size)
    assert clip.fps == 8.0
    assert clip.frame_indices == [int((i + 0.5) * frames / 4) for i in range(4)]
    every = media.read_video(mix / "videos" / name, num_frames=1000)
    assert every.frames.shape[0] == frames and every.frame_indices == list(range(frames))
    # the sampled frames are the same pictures as in the full decode
    assert torch.equal(clip.frames, every.frames[clip.frame_indices])
    at_2fps = media.read_video(mix / "videos" / name, fps=2.0)
    assert at_2fps.frame_indices == list(range(0, frames, 4))


@pytest.mark.parametrize(
    ("name", "seconds"),
    [("speech-fox.wav", None), ("speech-report.flac", None), ("tone-chord.flac", 2.0),
     ("tone-melody-long.flac", 40.0)],
)  # fmt: skip
def test_read_shipped_audio_at_16k(mix: Path, name: str, seconds: float | None):
    import soundfile as sf

    info = sf.info(str(mix / "audio" / name))
    wave = media.read_audio(mix / "audio" / name)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.numel() - info.frames * 16000 / info.samplerate) <= 1
    if seconds is not None:
        assert wave.numel() == int(seconds * 16000)
    assert 0.05 < float(wave.abs().max()) <= 1.0


def test_sample_frame_indices_rules():
    assert media.sample_frame_indices(10, 5.0, num_frames=4) == [1, 3, 6, 8]
    assert media.sample_frame_indices(3, 5.0, num_frames=8) == [0, 1, 2]
    assert media.sample_frame_indices(10, 10.0, fps=2.5) == [0, 4, 8]
    assert media.sample_frame_indices(10, 10.0, fps=30.0) == list(range(10))
    assert len(media.sample_frame_indices(100, 25.0)) == media.DEFAULT_VIDEO_FRAMES
    with pytest.raises(DataError, match="not both"):
        media.sample_frame_indices(10, 5.0, num_frames=2, fps=1.0)
    with pytest.raises(DataError, match="source frame rate"):
        media.sample_frame_indices(10, None, fps=1.0)


def _dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[int(np.argmax(spectrum))])


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampler_keeps_tones_and_rejects_aliases(rate: int):
    t = np.arange(rate) / rate  # one second
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    out = media.resample_audio(tone, rate, 16000)
    assert out.dtype == np.float32 and len(out) == 16000
    assert _dominant_frequency(out, 16000) == pytest.approx(1000.0, abs=1.0)
    # amplitude kept within 1% away from the edges (filter transients)
    assert float(np.abs(out[1000:-1000]).max()) == pytest.approx(0.5, rel=0.01)
    if rate > 20000:
        # a 10 kHz tone is above the new Nyquist (8 kHz): it must be filtered, not folded
        # down to 6 kHz; residual below -40 dB
        alias = media.resample_audio(0.5 * np.sin(2 * np.pi * 10000.0 * t), rate, 16000)
        assert float(np.sqrt(np.mean(alias[1000:-1000] ** 2))) < 0.5 / np.sqrt(2) * 0.01


def test_stereo_is_averaged_to_mono(tmp_path: Path):
    import soundfile as sf

    t = np.arange(16000) / 16000
    left, right = np.sin(2 * np.pi * 300 * t), np.zeros_like(t)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, right], axis=1) * 0.5, 16000)
    wave = media.read_audio(tmp_path / "s.wav").numpy()
    np.testing.assert_allclose(wave, 0.25 * left, atol=1e-4)  # PCM_16 quantization


def test_rgba_and_grey_images_become_rgb(tmp_path: Path):
    from PIL import Image

    Image.new("RGBA", (5, 4), (200, 100, 50, 0)).save(tmp_path / "a.png")
    Image.new("L", (5, 4), 77).save(tmp_path / "g.png")
    assert media.read_image(tmp_path / "a.png").sum() == 0  # transparent over black
    assert torch.equal(
        media.read_image(tmp_path / "g.png"), torch.full((3, 4, 5), 77, dtype=torch.uint8)
    )


def test_reader_errors_name_the_file(tmp_path: Path):
    (tmp_path / "x.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(media.MediaError) as info:
        media.read_audio(tmp_path / "x.wav")
    assert str(info.value).startswith(f"{tmp_path / 'x.wav'}: cannot decode audio:")
    with pytest.raises(DataError, match="file not found"):
        media.read_image(tmp_path / "none.png")
    import soundfile as sf

    sf.write(str(tmp_path / "click.wav"), np.zeros(200), 16000)
    with pytest.raises(media.MediaError, match=r"audio is 12.5 ms long; at least 25 ms"):
        media.check_audio(tmp_path / "click.wav")
    import av

    with av.open(str(tmp_path / "a.wav"), "w", format="wav") as out:  # audio-only container
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    with pytest.raises(media.MediaError, match="no video stream"):
        media.check_video(tmp_path / "a.wav")


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path):
    from PIL import Image

    mid = tmp_path / "mid16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(mid)
    assert Image.open(mid).mode.startswith("I;16")
    assert media.read_image(mid)[:, 0, 0].tolist() == [128, 128, 128]  # clipped: 255
    ramp = tmp_path / "ramp16.png"
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(ramp)
    assert media.read_image(ramp)[0, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path: Path):
    from PIL import Image

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (40, 20), (200, 30, 30)).save(path, exif=exif)
    assert tuple(media.read_image(path).shape) == (3, 40, 20)


def test_a_cut_stream_that_decodes_fewer_frames_is_an_error(tmp_path: Path):
    """A stream cut mid-GOP demuxes more packets than it decodes frames; sampling by
    packet count would silently return fewer frames with shifted indices."""
    import av

    whole = tmp_path / "whole.ts"
    with av.open(str(whole), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = 30  # a second keyframe to resume decoding at
        for i in range(60):
            frame = np.zeros((48, 64, 3), dtype=np.uint8)
            frame[:, (i % 8) * 8 : (i % 8) * 8 + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert len(media.read_video(whole, num_frames=16).frame_indices) == 16
    cut = tmp_path / "cut.ts"
    cut.write_bytes(whole.read_bytes()[188 * 40 :])  # drop the first 40 TS packets
    with pytest.raises(media.MediaError, match="sampled frames decoded"):
        media.read_video(cut, num_frames=16)
