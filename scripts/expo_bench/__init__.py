"""Benchmark expo_dist against baselines measured in the same run: figures and ratios, never a timed test.

    python scripts/bench.py                                  # Mistral-7B shapes, 8 layers (≈4.0 GB per model)
    python scripts/bench.py --preset tiny --repeat 1         # seconds, for checking the harness
    python scripts/bench.py --layers 1 --hidden-size 1024 --shard-bytes 60MB,40MB
    python scripts/bench.py --pair /data/pair --keep         # reuse PAIR/sft and PAIR/aligned
    python scripts/bench.py --memory                         # the memory criterion: every process < 1 GiB
    python scripts/bench.py --compare-mergekit --sweep "0.1 0.3 0.5" --json bench.json
    python scripts/bench.py --layers 2 --repeat 1 --s3       # also the merge to s3:// (SeaweedFS on 127.0.0.1)
    cd scripts && python -m expo_bench --preset tiny         # the same, as a package

Each of --repeat rounds measures, with the page cache dropped before each phase:
  ray_startup  `python -c "import ray; ray.init(address='local'); ray.shutdown()"` (a Ray of its own, no
               dashboard: as the merge's driver starts it)
  io_floor     read both inputs fully (16 MiB reads, one thread per input, at once), then write a file of the
               output's size and fsync it (--floor-overlap: write while reading); twice: through the page
               cache and with O_DIRECT. The faster of the two is the floor the ratios use.
  merge        `expo-dist merge ... --json -q` in a subprocess: the whole command, and the merge phase
               ("merge_seconds" of its JSON / manifest: from starting the worker actors to the last file
               sealed; Ray's start-up, planning and finishing are outside it), with the peak RSS of every
               process of its tree (driver, ray::MergeWorker actors, raylet, gcs_server, Ray's agents)
               sampled every 50 ms
then, once: mergekit task_arithmetic (--compare-mergekit), a several-α sweep (--sweep), and the merge to s3:// on
a local SeaweedFS against the read floor + the upload floor (--s3; its own --repeat rounds, see s3.py).

Generated pairs and outputs live in a temp folder (--workdir) that is removed at the end (--keep keeps
the pair). Figures go to stdout (and --json FILE); progress to stderr.
"""
