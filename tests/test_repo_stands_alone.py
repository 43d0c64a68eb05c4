"""The repository stands alone for the people who clone it: no page, docstring, config or test points at a file
outside it (the development machine's notes, a method file beside the checkout, a path of that machine)."""
import re
import subprocess

from conftest import ROOT

OUTSIDE = re.compile(r"\.\./shared|/work/(shared|main|base|wt-)|NOTES\.md")


def test_no_tracked_text_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for rel in files:
        if rel.startswith("bench/results/") or not rel.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml",
                                                                   ".txt", ".cfg", "Dockerfile", ".ci/run")):
            continue  # benchmark records keep the command lines as they were run
        for n, line in enumerate((ROOT / rel).read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and rel != "tests/test_repo_stands_alone.py":
                hits.append(f"{rel}:{n}: {line.strip()[:120]}")
    assert hits == [], "\n".join(hits)
