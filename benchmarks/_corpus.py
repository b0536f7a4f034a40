"""Jane Austen's novels, offline, from Debian's r-cran-janeaustenr (no R needed).

`apt-get download` the .deb, `dpkg-deb -x` it, and read the R lazy-load database with the
`rdata` package: Rdata.rdx holds (offset, length) per novel; each Rdata.rdb entry is a
4-byte length and a zlib-compressed R serialisation of a character vector of lines.
Texts are cached under <mlxkv cache>/corpus/<novel>.txt.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

from mlxkv.config import default_cache_dir

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
          "sensesensibility")


def _extract(dest: Path) -> None:
    import rdata

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), "x"], cwd=tmp, check=True)
        base = next(Path(tmp).glob("x/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = rdata.conversion.convert(rdata.parser.parse_file(str(base)))["variables"]
            raw = base.with_suffix(".rdb").read_bytes()
            for name in NOVELS:
                offset, length = (int(v) for v in index[name])
                blob = raw[offset : offset + length]
                assert struct.unpack(">I", blob[:4])[0] > 0
                lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
                (dest / f"{name}.txt").write_text("\n".join(str(s) for s in lines))


def austen(novel: str = "mansfieldpark") -> str:
    """The novel's text (fetched and cached on first use)."""
    dest = default_cache_dir() / "corpus"
    path = dest / f"{novel}.txt"
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        _extract(dest)
    return path.read_text()
