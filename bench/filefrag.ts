// What the benchmarks read from `filefrag -v -b4096` (an independent view of a file's layout).

/** The longest physically contiguous run of the file, in bytes, from filefrag's table. */
export function longestPhysicalRun(filefragText: string): { offset: number; size: number } {
  let best = { offset: 0, size: 0 };
  let cur = { start: -1, end: -1 };
  for (const line of filefragText.split("\n")) {
    // "   0:        0..    1023:      34816..     35839:   1024:" (4 KiB blocks).
    const m = line.match(/^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):\s+(\d+):/);
    if (!m) continue;
    const start = Number(m[1]);
    const end = Number(m[2]) + 1;
    if (start === cur.end) cur.end = end;
    else cur = { start, end };
    const size = (cur.end - cur.start) * 4096;
    if (size > best.size) best = { offset: cur.start * 4096, size };
  }
  return best;
}
