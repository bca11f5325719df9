"""The C side of a Python mirror, as the host gcc sees a bpf/ header: struct
layouts (sizeof, offsetof) and #define values. Used by test_records.py
(bpf/events.h) and test_guard_records.py (bpf/guards.h)."""
import os
import re
import shutil
import subprocess

import pytest

TYPES = ("typedef uint8_t __u8; typedef uint16_t __u16; typedef uint32_t __u32; "
         "typedef int32_t __s32; typedef uint64_t __u64; typedef int64_t __s64;")


def need_gcc():
    if shutil.which("gcc") is None:
        pytest.skip("host gcc not installed")


def layout(header, structs, workdir):
    """{struct: {field: (offset, size), "sizeof": (size, 0)}} for structs
    ({name: [field names]}) of header, compiled and run in workdir."""
    need_gcc()
    lines = ["#include <stdint.h>", "#include <stddef.h>", "#include <stdio.h>", TYPES,
             f'#include "{os.path.basename(header)}"', "int main(void) {"]
    for name, fields in structs.items():
        lines.append(f'  printf("{name} sizeof %zu 0\\n", sizeof(struct {name}));')
        lines += [f'  printf("{name} {f} %zu %zu\\n", offsetof(struct {name}, {f}), '
                  f"sizeof(((struct {name} *)0)->{f}));" for f in fields]
    lines += ["  return 0;", "}"]
    src, exe = os.path.join(workdir, "layout.c"), os.path.join(workdir, "layout")
    with open(src, "w") as f:
        f.write("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", os.path.dirname(header), "-o", exe, src],
                   check=True, capture_output=True, text=True)
    out = {}
    for line in subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines():
        name, field, off, size = line.split()
        out.setdefault(name, {})[field] = (int(off), int(size))
    return out


def defines(header):
    """{name: value text} of every AW_* #define of header, as gcc's preprocessor sees it."""
    need_gcc()
    out = subprocess.run(["gcc", "-dM", "-E", "-x", "c", header], check=True,
                         capture_output=True, text=True).stdout
    return {m[1]: m[2].strip() for m in re.finditer(r"^#define (AW_\w+) (.+)$", out, re.M)}
