"""Build the shipped test corpus tests/assets/c4_test/{train,validation}.jsonl from offline English prose.

The machines that build and test this project have no internet, so the corpus is harvested from text that every
Python install carries: the docstrings and comment blocks of the standard library, plus the license texts under
/usr/share/common-licenses when present. Paragraphs are cleaned, reflowed, deduplicated and packed into C4-like
documents of a few hundred to a few thousand characters. The output depends only on those inputs and --seed.

    python scripts/build_test_corpus.py            # writes tests/assets/c4_test/
"""

import argparse
import ast
import io
import json
import random
import re
import sysconfig
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")
# Test suites and third-party packages are not prose of the standard library; both are large.
SKIP_PARTS = {"site-packages", "test", "tests", "__pycache__"}
MIN_WORDS = 8
MIN_DOC_CHARS, MAX_DOC_CHARS = 300, 4000


def clean_paragraph(text: str) -> str | None:
    """Reflow one paragraph onto a single line; None when it looks like code, a table or a fragment."""
    if ">>>" in text or "::" in text or re.search(r"^\s{4,}\S", text, re.M):
        return None  # doctest, reST literal block or indented code example
    line = " ".join(text.split())
    if len(line.split()) < MIN_WORDS:
        return None
    prose_chars = sum(c.isalpha() or c.isspace() for c in line)
    if prose_chars < 0.85 * len(line) or not line[0].isalnum():
        return None
    return line


def paragraphs_of(block: str) -> list[str]:
    """Split a text block on blank lines into cleaned paragraphs."""
    cleaned = (clean_paragraph(p) for p in re.split(r"\n\s*\n", block))
    return [p for p in cleaned if p]


def stdlib_blocks(path: Path) -> list[str]:
    """Docstrings and comment blocks of one module, in source order."""
    with tokenize.open(path) as f:
        source = f.read()
    blocks = []  # (line, text)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                blocks.append((getattr(node, "lineno", 0), doc))
    # Consecutive comment lines form one block; a gap or code between them ends it.
    comment, last_line = [], -1
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        if tok.start[0] != last_line + 1 and comment:
            blocks.append((last_line, "\n".join(comment)))
            comment = []
        comment.append(tok.string.lstrip("#!").strip())
        last_line = tok.start[0]
    if comment:
        blocks.append((last_line, "\n".join(comment)))
    return [text for _, text in sorted(blocks)]


def sources() -> list[tuple[str, list[str]]]:
    """(url, paragraphs) for every input file, in sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = sysconfig.get_python_version()
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_PARTS & set(rel.parts):
            continue
        try:
            blocks = stdlib_blocks(path)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
            continue  # a few stdlib files are deliberately invalid (e.g. lib2to3 fixtures)
        paragraphs = [p for block in blocks for p in paragraphs_of(block)]
        out.append((f"https://github.com/python/cpython/blob/{version}/Lib/{rel.as_posix()}", paragraphs))
    if LICENSES.is_dir():
        for path in sorted(LICENSES.iterdir()):
            out.append((f"file://{path}", paragraphs_of(path.read_text(encoding="utf-8", errors="replace"))))
    return out


def documents(rng: random.Random) -> list[dict]:
    """Deduplicate paragraphs across all sources and pack each source's paragraphs into documents."""
    seen, docs = set(), []
    for url, paragraphs in sources():
        current, target = [], rng.randint(MIN_DOC_CHARS, MAX_DOC_CHARS)
        for paragraph in paragraphs:
            key = paragraph.lower()
            if key in seen:
                continue
            seen.add(key)
            current.append(paragraph)
            if sum(len(p) + 1 for p in current) >= target:
                docs.append({"text": "\n".join(current), "url": url})
                current, target = [], rng.randint(MIN_DOC_CHARS, MAX_DOC_CHARS)
        if sum(len(p) + 1 for p in current) >= MIN_DOC_CHARS:
            docs.append({"text": "\n".join(current), "url": url})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> int:
    """Write one JSON record per line; return the file size in bytes."""
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "tests/assets/c4_test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-chars", type=int, default=200_000)
    parser.add_argument("--train-chars", type=int, default=2_800_000)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    docs = documents(rng)
    rng.shuffle(docs)  # so that neither split is dominated by a few stdlib packages
    splits = {"validation": [], "train": []}
    budget = {"validation": args.validation_chars, "train": args.train_chars}
    for doc in docs:
        for split, chosen in splits.items():
            if budget[split] > 0:
                chosen.append(doc)
                budget[split] -= len(doc["text"])
                break
    args.out.mkdir(parents=True, exist_ok=True)
    for split, chosen in splits.items():
        size = write_jsonl(args.out / f"{split}.jsonl", chosen)
        print(f"{split}: {len(chosen)} documents, {size / 1e6:.2f} MB -> {args.out / f'{split}.jsonl'}")
    print(f"unused: {len(docs) - sum(map(len, splits.values()))} documents")


if __name__ == "__main__":
    main()
