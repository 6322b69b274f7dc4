"""The benchmark corpora gathered at run time from what the machine ships (scripts/bench_common.py): parsed from
stand-in files here, so the test does not depend on the packages installed; a missing source says what it needs."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_common as bc  # noqa: E402

CHANGELOG = """\
demo (1.2-1) unstable; urgency=medium

  * Fix the build when the optional documentation tools are not installed.
  * Update the watch file and the standards version to the newest one,
    and drop the old transitional dummy package nobody depends on.
    - Keep the shared library name so that existing binaries go on working.
  * Short entry.

 -- A Maintainer <someone@example.org>  Mon, 02 Jan 2023 13:06:21 +0100
"""

COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Files: *
Copyright: 2001-2020 Someone
License: Demo
 Permission is granted to use, copy and change this program for any purpose
 whatsoever, provided that this notice is kept with every copy of it.
 .
 The program is given as it is, without any promise that it works for any purpose.
"""


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    docs, licenses = tmp_path / "doc", tmp_path / "licenses"
    (docs / "demo").mkdir(parents=True)
    licenses.mkdir()
    with gzip.open(docs / "demo" / "changelog.Debian.gz", "wt") as f:
        f.write(CHANGELOG)
    (docs / "demo" / "copyright").write_text(COPYRIGHT)
    (docs / "other").mkdir()
    (docs / "other" / "copyright").write_text(COPYRIGHT)  # the same license again: kept once
    (licenses / "Demo").write_text("This license lets anyone share the program and the changes they make to it.\n")
    return docs, licenses


def test_changelog_entries_are_joined_prose(tmp_path):
    docs, _ = _tree(tmp_path)
    paras = bc.debian_changelogs_paragraphs(docs)
    assert paras == ["Fix the build when the optional documentation tools are not installed.",
                     "Update the watch file and the standards version to the newest one, and drop the old "
                     "transitional dummy package nobody depends on.",
                     "Keep the shared library name so that existing binaries go on working."]
    assert bc.debian_changelogs_paragraphs(docs, max_chars=10) == paras[:1]  # stops once it holds max_chars


def test_license_paragraphs_skip_fields_and_duplicates(tmp_path):
    docs, licenses = _tree(tmp_path)
    paras = bc.licenses_paragraphs(licenses, docs)
    assert paras == ["This license lets anyone share the program and the changes they make to it.",
                     "Permission is granted to use, copy and change this program for any purpose whatsoever, provided "
                     "that this notice is kept with every copy of it.",
                     "The program is given as it is, without any promise that it works for any purpose."]


def test_missing_source_names_what_it_needs(tmp_path):
    with pytest.raises(RuntimeError, match=r"debian_changelogs corpus needs .*changelog"):
        bc.debian_changelogs_paragraphs(tmp_path)
    with pytest.raises(RuntimeError, match="licenses corpus needs the license texts"):
        bc.licenses_paragraphs(tmp_path / "none", tmp_path)


def test_gathered_corpus_splits_and_records_its_size(tmp_path, monkeypatch):
    paras = [f"paragraph number {i} of a corpus written for this test only, nothing more" for i in range(45)]
    monkeypatch.setitem(bc.GATHERED, "licenses", (lambda: paras, ""))
    spec = bc.corpus("licenses", tmp_path)
    train, test = ((Path(spec) / f).read_text().splitlines() for f in ("train.txt", "test.txt"))
    assert test == paras[::20] and len(train) + len(test) == 45 and not set(train) & set(test)
    assert bc.corpus_name(spec) == "licenses" and bc.corpus_info(spec)["characters"] == sum(map(len, paras))
