"""Bundle pinning: one digest per bundle (sha256 of its manifest, which lists every other
file's sha256), shown by ``info``, refused when it is not the expected one by ``load``, the
CLI and ``serve``."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import scvi_onnx
from scvi_onnx.cli import main
from scvi_onnx.errors import BundleIntegrityError, InvalidArgumentError

from .conftest import QUERY, SHIPPED


@pytest.fixture()
def rewritten(tmp_path):
    """A whole bundle (checksums consistent) that is not the shipped one: its manifest says
    another validation tolerance."""
    dst = tmp_path / "rewritten"
    shutil.copytree(SHIPPED, dst)
    man = json.loads((dst / "manifest.json").read_text())
    man["validation"]["atol"] = 1.0
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def digest_of(path):
    return "sha256:" + hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def test_digest_is_the_manifest_sha256(shipped):
    assert shipped.digest == digest_of(SHIPPED)
    assert shipped.manifest.digest == shipped.digest


def test_load_with_expected_digest(rewritten, shipped):
    assert scvi_onnx.load(rewritten, device="cpu").digest == digest_of(rewritten)  # it is whole
    m = scvi_onnx.load(SHIPPED, device="cpu", expected_digest=shipped.digest)
    assert m.digest == shipped.digest
    bare = shipped.digest.removeprefix("sha256:").upper()
    assert scvi_onnx.load(SHIPPED, device="cpu", expected_digest=bare).digest == shipped.digest
    with pytest.raises(BundleIntegrityError, match="not the expected"):
        scvi_onnx.load(rewritten, device="cpu", expected_digest=shipped.digest)
    with pytest.raises(InvalidArgumentError, match="sha256"):
        scvi_onnx.load(SHIPPED, device="cpu", expected_digest="abc")


def test_info_shows_the_digest(capsys, shipped):
    assert main(["info", str(SHIPPED)]) == 0
    assert "digest:" in capsys.readouterr().out
    assert main(["info", str(SHIPPED), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == shipped.digest


def test_cli_expect_digest(capsys, tmp_path, rewritten, shipped):
    out = tmp_path / "z.npy"
    args = ["latent", str(rewritten), str(QUERY), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--expect-digest", shipped.digest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the expected" in err[0] and not out.exists()
    assert main(["verify", str(rewritten), "--expect-digest", shipped.digest]) == 2
    capsys.readouterr()
    good = ["elbo", str(SHIPPED), str(QUERY), "--device", "cpu", "--expect-digest", shipped.digest]
    assert main(good) == 0
    assert main(["verify", str(SHIPPED), "--expect-digest", shipped.digest]) == 0


def test_serve_names_and_pins(shipped, tmp_path):
    """``serve`` bundle arguments: folder names by default, ``--name NAME=PATH[@DIGEST]``
    renames or adds, two bundles under one name are refused."""
    from scvi_onnx.cli.common import CLIError
    from scvi_onnx.cli.parser import build_parser
    from scvi_onnx.serve.cli import bundle_specs

    def specs(*argv):
        return bundle_specs(build_parser().parse_args(["serve", *argv]))

    (s,) = specs(str(SHIPPED))
    assert (s.name, s.digest) == ("pbmc_scvi", None)
    (s,) = specs(f"{SHIPPED}@{shipped.digest}")
    assert s.path == SHIPPED and s.digest == shipped.digest
    (s,) = specs(str(SHIPPED), "--name", f"pbmc={SHIPPED}@{shipped.digest}")
    assert (s.name, s.digest) == ("pbmc", shipped.digest)
    a, b = specs(str(SHIPPED), "--name", f"other={tmp_path}")
    assert (a.name, b.name) == ("pbmc_scvi", "other")
    with pytest.raises(CLIError, match="two bundles would be served as pbmc_scvi"):
        specs(str(SHIPPED), "--name", f"pbmc_scvi={tmp_path}")
    with pytest.raises(CLIError, match="NAME=PATH"):
        specs("--name", "nopath")
    with pytest.raises(InvalidArgumentError, match="letters, digits"):
        specs("--name", f"bad/name={SHIPPED}")
    # a pin cut short: said so (it was read as part of the path, then refused as a bad name)
    with pytest.raises(CLIError, match="sha256: and 64 hex digits .got 8 characters"):
        specs(f"{SHIPPED}@{shipped.digest[:15]}")
