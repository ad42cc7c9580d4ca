"""The scheduler's bookkeeping without Ray (runtime/filestate.py): which node gets which task, which node owns
which output file and what happens when a node's worker dies, and how far each file's sha256 may go."""

from __future__ import annotations

import subprocess
import sys

from expo_dist.planning.plan import COPY, EXTRAPOLATE, Segment, Task
from expo_dist.runtime.filestate import HASH_STEP, FileOwnership, HashFrontier

MIB = 1 << 20


def task(tid: int, file: str, begin: int, end: int, inputs: tuple[str, ...] = ("a0.safetensors",)) -> Task:
    """A task of the output file's bytes [begin, end) that reads these input files (one segment per pair)."""
    segs = []
    for k in range(0, len(inputs), 2):
        a, s = inputs[k], inputs[k + 1] if k + 1 < len(inputs) else None
        segs.append(Segment(EXTRAPOLATE if s else COPY, f"t{tid}.{k}", begin, (end - begin) // 2, "bfloat16",
                            a, 0, "bfloat16", s, 0, "bfloat16", (0.5,)))
    return Task(tid, 0, file, begin, end, tuple(segs))


def three_files(per_file: int = 2) -> tuple[list[str], list[Task]]:
    files = ["out-1.safetensors", "out-2.safetensors", "out-3.safetensors"]
    tasks, tid = [], 0
    for f in files:
        for k in range(per_file):
            tasks.append(task(tid, f, k * 100, (k + 1) * 100))
            tid += 1
    return files, tasks


# ---- FileOwnership ----------------------------------------------------------------------------------------


def test_nodes_claim_files_in_plan_order_keep_them_and_help_at_the_tail():
    files, tasks = three_files()
    own = FileOwnership(files, tasks)
    assert own.next_task("A").id == 0  # A claims out-1
    assert own.next_task("B").id == 2  # out-1 is A's: B claims out-2
    assert own.owner == {files[0]: "A", files[1]: "B"}
    assert list(own.unclaimed) == [files[2]]
    assert own.next_task("A").id == 1  # A keeps its file
    assert own.next_task("A").id == 4  # out-1 handed out: A claims the next unclaimed file
    assert own.owner[files[2]] == "A"
    assert own.next_task("B").id == 3  # B keeps its own
    # nothing unclaimed, B's file handed out: B helps the file with the most tasks left (A's out-3)
    assert own.next_task("B").id == 5
    assert own.next_task("A") is None and own.next_task("B") is None
    assert not own.has_work()


def test_tail_helps_the_file_with_most_tasks_left_first_in_plan_order_on_a_tie():
    files = ["f1", "f2", "f3"]
    tasks = [task(0, "f1", 0, 100), task(1, "f2", 0, 100), task(2, "f2", 100, 200), task(3, "f2", 200, 300),
             task(4, "f3", 0, 100), task(5, "f3", 100, 200), task(6, "f3", 200, 300)]
    own = FileOwnership(files, tasks)
    assert [own.next_task(n).id for n in ("A", "B", "C")] == [0, 1, 4]
    # A has nothing left and nothing is unclaimed: f2 and f3 both have 2 left -> f2 (plan order)
    assert own.next_task("A").id == 2
    assert own.next_task("A").id == 5  # now f3 has 2, f2 has 1
    assert own.owner == {"f1": "A", "f2": "B", "f3": "C"}  # helping does not claim


def test_a_node_prefers_the_file_whose_inputs_it_already_read():
    files = ["f1", "f2", "f3", "f4"]
    tasks = [task(0, "f1", 0, 100, ("x1", "y1")), task(1, "f2", 0, 100, ("x2", "y2")),
             task(2, "f3", 0, 100, ("x3", "y1")), task(3, "f4", 0, 100, ("x1", "y1"))]
    own = FileOwnership(files, tasks)
    t = own.next_task("A")
    assert t.id == 0
    assert own.done(t, "A") is True  # f1's only task
    assert own.node_inputs["A"] == {"x1", "y1"}
    # unclaimed f2 (no common input), f3 (y1), f4 (x1 and y1): A takes f4 although f2 and f3 come first
    assert own.next_task("A").id == 3
    assert own.owner["f4"] == "A"
    # a node that has read nothing takes the first unclaimed file
    assert own.next_task("B").id == 1
    assert own.next_task("C").id == 2


def test_on_a_tie_in_common_inputs_the_first_unclaimed_file_wins():
    files = ["f1", "f2", "f3", "f4"]
    tasks = [task(0, "f1", 0, 100, ("x0", "y1")), task(1, "f2", 0, 100, ("x2", "y2")),
             task(2, "f3", 0, 100, ("x3", "y1")), task(3, "f4", 0, 100, ("x4", "y1"))]
    own = FileOwnership(files, tasks)
    own.done(own.next_task("A"), "A")  # A read y1: f3 and f4 share one input each with it
    assert own.next_task("A").id == 2
    assert list(own.unclaimed) == ["f2", "f4"]


def test_done_reports_the_last_task_of_a_file():
    files, tasks = three_files(per_file=3)
    own = FileOwnership(files, tasks)
    got = [own.next_task("A") for _ in range(3)]
    assert [t.id for t in got] == [0, 1, 2]
    assert [own.done(t, "A") for t in (got[1], got[0], got[2])] == [False, False, True]
    assert own.remaining[files[0]] == 0 and own.remaining[files[1]] == 3


def test_a_lost_task_goes_first_and_its_file_is_released_to_be_claimed_anew():
    files, tasks = three_files(per_file=3)
    own = FileOwnership(files, tasks)
    a1, a2 = own.next_task("A"), own.next_task("A")  # A holds out-1's tasks 0 and 1
    b1 = own.next_task("B")
    assert (a1.id, a2.id, b1.id) == (0, 1, 3)
    assert list(own.unclaimed) == [files[2]]
    # A's node died: the scheduler gives back what A held, the queued one first, the running one last
    own.give_back(a2)
    own.give_back(a1)
    assert files[0] not in own.owner
    assert list(own.unclaimed) == [files[0], files[2]]  # released, first in line (not duplicated)
    assert [t.id for t in own.todo[files[0]]] == [0, 1, 2]
    assert own.next_task("B").id == 4  # B keeps its own file
    assert own.next_task("C").id == 0  # a new node claims the released file and starts where A was
    assert own.owner[files[0]] == "C"
    assert own.next_task("C").id == 1
    assert own.next_task("D").id == 6  # then out-3
    assert own.remaining[files[0]] == 3  # given back, not done


def test_a_file_given_back_while_still_owned_by_a_live_node_is_released_too():
    # (a worker died on a node whose other workers live: the file is claimed anew, perhaps by the same node)
    files, tasks = three_files()
    own = FileOwnership(files, tasks)
    t = own.next_task("A")
    own.give_back(t)
    assert own.owner == {} and list(own.unclaimed) == files
    assert own.next_task("B").id == 0


def test_resumed_tasks_are_not_handed_out_and_finished_files_are_not_claimed():
    files, tasks = three_files()
    own = FileOwnership(files, tasks, skip={0, 1, 3})
    assert list(own.unclaimed) == [files[1], files[2]]  # out-1 is done: nothing to claim there
    assert not own.has_work(files[0]) and own.has_work(files[1]) and own.has_work()
    assert own.remaining == {files[1]: 1, files[2]: 2}
    t = own.next_task("A")
    assert t.id == 2
    assert own.done(t, "A") is True  # out-2's only task left
    assert [own.next_task("B").id, own.next_task("B").id] == [4, 5]
    assert own.next_task("A") is None


# ---- HashFrontier -----------------------------------------------------------------------------------------


def file_of(sizes_mib: list[int], file: str = "out.safetensors", first_id: int = 0) -> list[Task]:
    out, pos = [], 0
    for k, s in enumerate(sizes_mib):
        out.append(task(first_id + k, file, pos * MIB, (pos + s) * MIB))
        pos += s
    return out


def test_the_frontier_moves_only_over_contiguous_done_tasks():
    tasks = file_of([100, 100, 100, 50])  # 350 MiB; HASH_STEP is 256 MiB
    fr = HashFrontier(["out.safetensors"], reversed(tasks))  # handed in any order: byte order counts
    assert HASH_STEP == 256 * MIB
    fr.done(tasks[1])
    assert fr.due("out.safetensors") is None and fr.index["out.safetensors"] == 0
    fr.done(tasks[0])
    assert fr.due("out.safetensors") is None  # 200 MiB final: under a HASH_STEP
    assert fr.index["out.safetensors"] == 2
    fr.done(tasks[3])
    assert fr.due("out.safetensors") is None and fr.index["out.safetensors"] == 2  # task 2 is the gap
    fr.done(tasks[2])
    assert fr.due("out.safetensors") == 350 * MIB  # complete: the whole file, step or not
    assert fr.index["out.safetensors"] == 4


def test_the_hasher_is_told_every_hash_step_and_at_the_end():
    tasks = file_of([100] * 7)  # 700 MiB
    fr = HashFrontier(["out.safetensors"], tasks)
    got = []
    for t in tasks:
        fr.done(t)
        upto = fr.due("out.safetensors")
        if upto is not None:
            fr.tell("out.safetensors", upto)
            got.append(upto // MIB)
    assert got == [300, 600, 700]  # 300 - 0 >= 256, 600 - 300 >= 256, 700: the end
    assert fr.told["out.safetensors"] == 700 * MIB
    assert fr.due("out.safetensors") is None  # nothing new


def test_exactly_one_hash_step_is_due():
    tasks = file_of([128, 128, 100])
    fr = HashFrontier(["out.safetensors"], tasks)
    fr.done(tasks[0])
    assert fr.due("out.safetensors") is None  # 128 MiB
    fr.done(tasks[1])
    assert fr.due("out.safetensors") == HASH_STEP  # 256 MiB: exactly one step
    fr.tell("out.safetensors", HASH_STEP)
    assert fr.due("out.safetensors") is None


def test_until_told_the_same_offset_stays_due_and_a_lost_hasher_starts_from_zero():
    tasks = file_of([200, 200, 200])
    fr = HashFrontier(["out.safetensors"], tasks)
    fr.done(tasks[0])
    assert fr.due("out.safetensors") is None  # 200 MiB
    fr.done(tasks[1])
    assert fr.due("out.safetensors") == 400 * MIB
    assert fr.due("out.safetensors") == 400 * MIB  # no hasher took it yet: still due
    fr.tell("out.safetensors", 400 * MIB)
    assert fr.due("out.safetensors") is None
    fr.forget("out.safetensors")  # the hasher died: a new one hashes from byte 0
    assert fr.due("out.safetensors") == 400 * MIB


def test_resumed_tasks_count_as_done():
    tasks = file_of([100, 100, 100, 100])
    fr = HashFrontier(["out.safetensors"], tasks, skip={0, 1, 2})
    assert fr.due("out.safetensors") == 300 * MIB
    fr = HashFrontier(["out.safetensors"], tasks, skip={0, 2, 3})  # a gap at task 1
    assert fr.due("out.safetensors") is None and fr.index["out.safetensors"] == 1
    small = file_of([1, 2])
    fr = HashFrontier(["out.safetensors"], small, skip={0, 1})  # all done: due at once, under a step
    assert fr.due("out.safetensors") == 3 * MIB


def test_files_have_their_own_frontiers():
    a, b = file_of([300], "a"), file_of([10, 10], "b", first_id=1)
    fr = HashFrontier(["a", "b", "empty"], a + b, step=16 * MIB)
    assert fr.files == ["a", "b", "empty"]
    fr.done(b[0])
    assert fr.due("a") is None and fr.due("b") is None  # 10 MiB of b: under the step given
    fr.done(b[1])
    assert fr.due("b") == 20 * MIB and fr.due("a") is None
    assert fr.due("empty") is None  # a file without tasks has nothing to hash along


def test_filestate_imports_no_ray():
    code = "import sys, expo_dist.runtime.filestate; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
