# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled request path: the record line and the step timer.

The request's record line, formatted in C: byte for byte what ``Trace.line`` writes.

The pure-Python ``Trace.line`` (interval arithmetic in ``Trace.spans``, msgspec for the
encoding) is the reference and the fallback: it runs where this module was not built,
under ``LOOPWATCH_PURE_PYTHON=1``, and for whatever this one returns None for (a trace
too big for its fixed bounds, a number too large for 64 bits). The arithmetic is the
same as ``trace._union`` and ``trace._emit``; milliseconds are written from the integer
microseconds (``ns // 1000``) as the shortest decimal that reads back as
``ns // 1000 / 1000``, which is what ``repr`` and msgspec write for that float; strings
and the other floats go through the same msgspec encoder as the Python path. A line
with text beyond ASCII is left to the Python path.

The step timer (``StepTimer``, on ``StepState`` and ``MonitorState``, the C bases of
``trace.Trace`` and ``loop.LoopMonitor``): ``steps.StepTimer`` in C, below.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)

import msgspec

INTERFACE = 2  # compiled.INTERFACE: what this module offers

_encode = msgspec.json.Encoder().encode

cdef enum:
    CPU = 0  # kinds in the order of their names, as Python sorts the (start, kind, end)
    DB = 1
    LOOP = 2
    POOL = 3
    MAX_FLAT_IN = 2048  # longer interval lists: the Python path
    MAX_SEGMENTS = 512  # as trace.MAX_INTERVALS: past it, the Python path caps per kind

cdef const char* KIND_TEXT[4]
cdef Py_ssize_t KIND_LEN[4]
KIND_TEXT[0] = b'["cpu",'
KIND_TEXT[1] = b'["db",'
KIND_TEXT[2] = b'["loop",'
KIND_TEXT[3] = b'["pool",'
KIND_LEN[:] = [7, 6, 8, 8]


cdef struct Seg:
    long long a
    int kind
    long long b


cdef struct Buf:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int put(Buf* buf, const char* s, Py_ssize_t k) except -1:
    cdef Py_ssize_t cap
    cdef char* p
    if buf.n + k > buf.cap:
        cap = buf.cap * 2
        if cap < buf.n + k:
            cap = buf.n + k + 256
        p = <char*>PyMem_Realloc(buf.p, cap)
        if p == NULL:
            raise MemoryError()
        buf.p = p
        buf.cap = cap
    memcpy(buf.p + buf.n, s, k)
    buf.n += k
    return 0


cdef int put_int(Buf* buf, long long v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    cdef bint neg = v < 0
    cdef unsigned long long u = <unsigned long long>(-v) if neg else <unsigned long long>v
    while True:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if neg:
        i -= 1
        tmp[i] = 45  # '-'
    return put(buf, tmp + i, 24 - i)


cdef int put_ms(Buf* buf, long long ns) except -1:
    """``ns // 1000 / 1000`` as Python writes it (floor division, then the shortest
    decimal: at most three digits after the point, at least one)."""
    cdef long long us = ns // 1000
    cdef char frac[5]
    cdef int k = 0
    cdef long long f
    if ns < 0 and ns % 1000 != 0:  # C truncates towards zero, Python floors
        us -= 1
    if us < 0:
        put(buf, b"-", 1)
        us = -us
    put_int(buf, us // 1000)
    f = us % 1000
    frac[0] = 46  # '.'
    frac[1] = <char>(48 + f // 100)
    frac[2] = <char>(48 + (f // 10) % 10)
    frac[3] = <char>(48 + f % 10)
    k = 4
    while k > 2 and frac[k - 1] == 48:
        k -= 1
    return put(buf, frac, k)


cdef int put_json(Buf* buf, object value) except -1:
    """``value`` as msgspec encodes it, as the Python path does."""
    cdef bytes data = _encode(value)
    return put(buf, data, len(data))


cdef const char* HEX = b"0123456789abcdef"


cdef int put_str(Buf* buf, object value) except -1:
    """A JSON string, or null: for ASCII text, the bytes msgspec writes (``"`` and ``\\``
    escaped, control characters as msgspec escapes them), copied here without a call.
    Text beyond ASCII raises ValueError: the Python path writes those lines (escaped, as
    json.dumps does)."""
    cdef Py_ssize_t n, i, start
    cdef const unsigned char* p
    cdef unsigned char ch
    cdef char esc[6]
    if value is None:
        return put(buf, b"null", 4)
    if type(value) is not str:
        return put_json(buf, value)  # (a str subclass: msgspec says what it writes)
    if not PyUnicode_IS_COMPACT_ASCII(value):
        raise ValueError("not ASCII")
    p = <const unsigned char*>PyUnicode_DATA(value)
    n = PyUnicode_GET_LENGTH(value)
    put(buf, b'"', 1)
    start = 0
    for i in range(n):
        ch = p[i]
        if ch >= 32 and ch != 34 and ch != 92:
            continue
        put(buf, <const char*>p + start, i - start)
        start = i + 1
        esc[0] = 92  # backslash
        if ch == 34 or ch == 92:
            esc[1] = ch
            put(buf, esc, 2)
        elif ch == 10:
            put(buf, b"\\n", 2)
        elif ch == 13:
            put(buf, b"\\r", 2)
        elif ch == 9:
            put(buf, b"\\t", 2)
        elif ch == 8:
            put(buf, b"\\b", 2)
        elif ch == 12:
            put(buf, b"\\f", 2)
        else:
            esc[1] = 117  # u
            esc[2] = 48
            esc[3] = 48
            esc[4] = HEX[ch >> 4]
            esc[5] = HEX[ch & 15]
            put(buf, esc, 6)
    put(buf, <const char*>p + start, n - start)
    return put(buf, b'"', 1)


cdef bint ascii_alnum(object value):
    """str.isalnum() for ASCII text."""
    cdef const unsigned char* p = <const unsigned char*>PyUnicode_DATA(value)
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(value)
    cdef unsigned char ch
    for i in range(n):
        ch = p[i]
        if not (48 <= ch <= 57 or 65 <= ch <= 90 or 97 <= ch <= 122):
            return False
    return n > 0


cdef int read(object flat, long long* out, Py_ssize_t n) except -1:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = flat[i]
    return 0


cdef Py_ssize_t first_after(long long* h1s, Py_ssize_t nh, long long a):
    """bisect_right(h1s, a): the first hole ending after ``a``."""
    cdef Py_ssize_t lo = 0, hi = nh, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if a < h1s[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef long long emit(long long a, long long b, int kind, Seg* out, Py_ssize_t* nout,
                    long long* h0s, long long* h1s, Py_ssize_t nh, long long segment_ns):
    cdef Py_ssize_t k = first_after(h1s, nh, a)
    cdef long long total = 0, cut = 0, h0, h1
    if k == nh or h0s[k] >= b:
        out[nout[0]] = Seg(a, kind, b)
        nout[0] += 1
        return b - a
    while k < nh:
        h0 = h0s[k]
        if h0 >= b:
            break
        h1 = h1s[k]
        k += 1
        if h1 - h0 < segment_ns:
            cut += (h1 if h1 < b else b) - (h0 if h0 > a else a)
            continue
        if h0 - cut > a:
            out[nout[0]] = Seg(a, kind, h0 - cut)
            nout[0] += 1
            total += h0 - cut - a
        cut = 0
        if h1 > a:
            a = h1
        if a >= b:
            return total
    if b - cut > a:
        out[nout[0]] = Seg(a, kind, b - cut)
        nout[0] += 1
        total += b - cut - a
    return total


cdef long long union(long long* flat, Py_ssize_t n, long long start, long long end, int kind,
                     Seg* out, Py_ssize_t* nout, long long* h0s, long long* h1s, Py_ssize_t nh,
                     long long segment_ns):
    """Sort the intervals by (start, end) in place, merge, clip and emit them."""
    cdef Py_ssize_t i, j
    cdef long long a, b, cur_a = -1, cur_b = -1, total = 0
    for i in range(2, n, 2):  # insertion sort of pairs: a request has a few intervals
        a = flat[i]
        b = flat[i + 1]
        j = i
        while j > 0 and (flat[j - 2] > a or (flat[j - 2] == a and flat[j - 1] > b)):
            flat[j] = flat[j - 2]
            flat[j + 1] = flat[j - 1]
            j -= 2
        flat[j] = a
        flat[j + 1] = b
    for i in range(0, n, 2):
        a = flat[i] if flat[i] > start else start
        b = flat[i + 1] if flat[i + 1] < end else end
        if b <= a:
            continue
        if a <= cur_b:
            if b > cur_b:
                cur_b = b
            continue
        if cur_b > cur_a:
            total += emit(cur_a, cur_b, kind, out, nout, h0s, h1s, nh, segment_ns)
        cur_a = a
        cur_b = b
    if cur_b > cur_a:
        total += emit(cur_a, cur_b, kind, out, nout, h0s, h1s, nh, segment_ns)
    return total


cdef void sort_segments(Seg* s, Py_ssize_t n):
    cdef Py_ssize_t i, j
    cdef Seg x
    for i in range(1, n):
        x = s[i]
        j = i
        while j > 0 and (s[j - 1].a > x.a or (s[j - 1].a == x.a and (
                s[j - 1].kind > x.kind or (s[j - 1].kind == x.kind and s[j - 1].b > x.b)))):
            s[j] = s[j - 1]
            j -= 1
        s[j] = x


def request_line(trace, sample_rate, long long segment_ns):
    """The line of a closed ``trace`` (bytes, no newline), or None where the Python path
    must write it. ``segment_ns``: trace.SEGMENT_NS, the shortest loop wait drawn."""
    cdef list cpu_l = trace.cpu, db_l = trace.db, pool_l = trace.pool, loop_l = trace.loop
    cdef Py_ssize_t ncpu = len(cpu_l), ndb = len(db_l), npool = len(pool_l), nloop = len(loop_l)
    cdef Py_ssize_t nh = nloop // 2, nout = 0, i, cap
    cdef long long start, end, db_ns = 0, pool_ns = 0
    cdef long long* ints = NULL
    cdef long long *cpu, *db, *pool, *loop, *h0s, *h1s
    cdef Seg* segs = NULL
    cdef Buf buf
    cdef object value
    buf.p = NULL
    if trace.more is not None or max(ncpu, ndb, npool, nloop) > MAX_FLAT_IN:
        return None
    try:
        start = trace.start_ns
        end = trace.end_ns
        ints = <long long*>PyMem_Malloc((ncpu + ndb + npool + nloop + 1) * sizeof(long long))
        # At most: every cpu and loop interval, and each db or pool piece split by every hole.
        cap = ncpu // 2 + nh + (ndb // 2 + npool // 2) * (nh + 1) + 1
        segs = <Seg*>PyMem_Malloc(cap * sizeof(Seg))
        buf.p = <char*>PyMem_Malloc(512)
        buf.n = 0
        buf.cap = 512
        if ints == NULL or segs == NULL or buf.p == NULL:
            raise MemoryError()
        cpu = ints
        db = cpu + ncpu
        pool = db + ndb
        loop = pool + npool
        read(cpu_l, cpu, ncpu)
        read(db_l, db, ndb)
        read(pool_l, pool, npool)
        read(loop_l, loop, nloop)
        for i in range(0, ncpu, 2):
            segs[nout] = Seg(cpu[i], CPU, cpu[i + 1])
            nout += 1
        if ndb or npool or nloop:
            # The waits' starts and ends, apart (they are sorted and disjoint).
            h0s = <long long*>PyMem_Malloc((nh + 1) * 2 * sizeof(long long))
            if h0s == NULL:
                raise MemoryError()
            h1s = h0s + nh + 1
            try:
                for i in range(nh):
                    h0s[i] = loop[2 * i]
                    h1s[i] = loop[2 * i + 1]
                    if h1s[i] - h0s[i] >= segment_ns:
                        segs[nout] = Seg(h0s[i], LOOP, h1s[i])
                        nout += 1
                if ndb or npool:
                    if ndb:
                        db_ns = union(db, ndb, start, end, DB, segs, &nout, h0s, h1s, nh,
                                      segment_ns)
                    if npool:
                        pool_ns = union(pool, npool, start, end, POOL, segs, &nout, h0s, h1s,
                                        nh, segment_ns)
            finally:
                PyMem_Free(h0s)
            sort_segments(segs, nout)
        if nout > MAX_SEGMENTS:
            return None  # the Python path caps each kind and counts the rest

        put(&buf, b'{"type":"request","id":', 23)
        value = trace.id_prefix
        if not (type(value) is str and PyUnicode_IS_COMPACT_ASCII(value)
                and ascii_alnum(value)):
            return None  # (a hex prefix: nothing to escape)
        put_str(&buf, value)
        buf.n -= 1  # its closing quote
        put(&buf, b"-", 1)
        put_int(&buf, trace.seq)
        put(&buf, b'","pid":', 8)
        put_int(&buf, trace.pid)
        put(&buf, b',"start":', 9)
        put_json(&buf, trace.start_unix)  # (msgspec: 6x faster than repr's digits)
        put(&buf, b',"method":', 10)
        put_str(&buf, trace.method)
        put(&buf, b',"path":', 8)
        put_str(&buf, trace.path)
        put(&buf, b',"route":', 9)
        put_str(&buf, trace.route)
        put(&buf, b',"status":', 10)
        value = trace.status
        if value is None:
            put(&buf, b"null", 4)
        else:
            put_int(&buf, value)
        put(&buf, b',"wall_ms":', 11)
        put_ms(&buf, <long long>trace.end_ns - start)
        put(&buf, b',"cpu_ms":', 10)
        put_ms(&buf, (<StepState?>trace).cpu_ns)
        put(&buf, b',"db_ms":', 9)
        put_ms(&buf, db_ns)
        put(&buf, b',"pool_wait_ms":', 16)
        put_ms(&buf, pool_ns)
        put(&buf, b',"loop_wait_ms":', 16)
        put_ms(&buf, trace.loop_ns)
        put(&buf, b',"db_queries":', 14)
        put_int(&buf, trace.queries)
        put(&buf, b',"rss_bytes":', 13)
        value = trace.rss
        if value is None:
            put(&buf, b"null", 4)
        else:
            put_int(&buf, value)
        put(&buf, b',"segments":[', 13)
        for i in range(nout):
            if i:
                put(&buf, b",", 1)
            put(&buf, KIND_TEXT[segs[i].kind], KIND_LEN[segs[i].kind])
            put_ms(&buf, segs[i].a - start)
            put(&buf, b",", 1)
            put_ms(&buf, segs[i].b - start)
            put(&buf, b"]", 1)
        put(&buf, b"]", 1)
        value = trace.statements
        if value is not None:
            put(&buf, b',"db_statements":', 17)
            put_int(&buf, value)
        value = trace.error
        if value is not None:
            put(&buf, b',"error":', 9)
            put_str(&buf, value)
        value = trace.dropped
        if value:
            put(&buf, b',"segments_dropped":', 20)
            put_int(&buf, value)
        value = trace.blocked_by
        if value is not None:
            put(&buf, b',"blocked_by":{"id":', 20)
            put_str(&buf, value.id)
            put(&buf, b',"method":', 10)
            put_str(&buf, value.method)
            put(&buf, b',"route":', 9)
            put_str(&buf, value.route)
            put(&buf, b',"held_ms":', 11)
            put_json(&buf, value.held_ms)
            put(&buf, b',"cpu_ms":', 10)
            put_json(&buf, value.cpu_ms)
            put(&buf, b"}", 1)
        if sample_rate is not None:
            put(&buf, b',"sample_rate":', 15)
            put_json(&buf, sample_rate)
        put(&buf, b"}", 1)
        return PyBytes_FromStringAndSize(buf.p, buf.n)
    except (OverflowError, TypeError, ValueError):
        # A number past 64 bits, a status that is no int: the Python path writes it.
        return None
    finally:
        PyMem_Free(ints)
        PyMem_Free(segs)
        PyMem_Free(buf.p)


# --- The step timer ----------------------------------------------------------------------
#
# steps.StepTimer in C: the same reads and writes of the trace and the loop monitor, the
# same clocks (CLOCK_MONOTONIC is what time.perf_counter_ns reads on Linux,
# CLOCK_THREAD_CPUTIME_ID what time.thread_time_ns reads; steps.py checks they agree
# before it uses this class), the same calls into Python for the rare paths (an idle or
# long gap, a loop wait, a long step). What it saves is the Python around them: the
# protocol methods called through slots, and the StopIteration each step ends with.

from cpython.object cimport PyObject
from cpython.ref cimport Py_XDECREF

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    int CLOCK_MONOTONIC
    int CLOCK_THREAD_CPUTIME_ID

cdef extern from "Python.h":
    ctypedef enum PySendResult:
        PYGEN_RETURN
        PYGEN_ERROR
        PYGEN_NEXT
    PySendResult PyIter_Send(object iter, object arg, PyObject** presult)


cdef long long IDLE = -1
cdef long long _idle_ns = 0, _long_ns = 0, _min_wait_ns = 0, _merge_gap_ns = 0
cdef Py_ssize_t _max_flat = 0


cdef class StepState:
    """trace.Trace's base: the clocks every step reads and writes (ns), as C integers."""

    cdef public long long cpu_ns, last_w1, step_c0, step_w0


cdef class MonitorState:
    """loop.LoopMonitor's base: the clocks every step reads and writes (ns)."""

    cdef public long long busy_w0, last_c1, last_w1, run_w0


cdef MonitorState _monitor = None


def configure(MonitorState monitor, long long idle_ns, long long long_ns,
              long long min_wait_ns, long long merge_gap_ns, Py_ssize_t max_flat):
    """The loop monitor and the thresholds (ns) of loop.py and trace.py, as steps.py
    reads them (again after a benchmark scales them)."""
    global _monitor, _idle_ns, _long_ns, _min_wait_ns, _merge_gap_ns, _max_flat
    _monitor = monitor
    _idle_ns, _long_ns, _min_wait_ns = idle_ns, long_ns, min_wait_ns
    _merge_gap_ns, _max_flat = merge_gap_ns, max_flat


cdef inline long long now_ns(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return <long long>ts.tv_sec * 1000000000LL + ts.tv_nsec


def clocks():
    """(CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID) now, in ns: for steps.py's check."""
    return now_ns(CLOCK_MONOTONIC), now_ns(CLOCK_THREAD_CPUTIME_ID)


cdef class StepTimer:
    """Wrap a coroutine and charge each of its steps to ``trace`` while the trace is open
    (steps.StepTimer, compiled)."""

    cdef object _coro
    cdef StepState _trace

    def __init__(self, coro, StepState trace):
        self._coro = coro
        self._trace = trace

    cdef PySendResult _step(self, object value, PyObject** result) except PYGEN_ERROR:
        cdef StepState trace = self._trace
        cdef MonitorState m
        cdef long long w0, c0, dw, off, lw0, w1, c1
        cdef PySendResult status
        cdef list cpu
        cdef Py_ssize_t n
        if trace.step_c0 != IDLE:  # a step already running, or the request over
            status = PyIter_Send(self._coro, value, result)
            if status == PYGEN_ERROR:
                raise_current()
            return status
        w0 = now_ns(CLOCK_MONOTONIC)
        c0 = now_ns(CLOCK_THREAD_CPUTIME_ID)
        trace.step_w0 = w0
        trace.step_c0 = c0
        m = _monitor
        if m is None:
            raise RuntimeError("the step timer runs before configure()")
        dw = w0 - m.last_w1
        off = dw - (c0 - m.last_c1)
        if off > _idle_ns or off < -_idle_ns or dw >= _long_ns:
            (<object>m).gap(w0, c0)
        m.run_w0 = w0
        lw0 = trace.last_w1
        if m.busy_w0 > lw0:
            lw0 = m.busy_w0
        if w0 - lw0 >= _min_wait_ns:
            (<object>trace).waited(lw0, w0)
        try:
            status = PyIter_Send(self._coro, value, result)
            if status == PYGEN_ERROR:
                raise_current()
        finally:
            # close() may have ended the step (and the request) from inside it.
            if trace.step_c0 == c0:
                # Trace.end_step, inlined.
                w1 = now_ns(CLOCK_MONOTONIC)
                c1 = now_ns(CLOCK_THREAD_CPUTIME_ID)
                trace.cpu_ns += c1 - c0
                trace.step_c0 = IDLE
                trace.last_w1 = w1
                m.last_w1 = w1
                m.last_c1 = c1
                m.run_w0 = 0
                if w1 - w0 >= _long_ns:
                    (<object>m).long_step(w0, w1, c1 - c0, trace)
                cpu = (<object>trace).cpu
                n = len(cpu)  # (no negative index: this module does not wrap around)
                if n and w0 - <long long>cpu[n - 1] < _merge_gap_ns:
                    cpu[n - 1] = w1
                elif n < _max_flat:
                    cpu.append(w0)
                    cpu.append(w1)
                else:
                    (<object>trace).dropped += 1
        return status

    def send(self, value=None):
        cdef PyObject* result = NULL
        cdef PySendResult status = self._step(value, &result)
        out = <object>result
        Py_XDECREF(result)
        if status == PYGEN_RETURN:
            raise StopIteration(out) if out is not None else StopIteration
        return out

    def __next__(self):
        # (send's body again: a raise in a shared cdef function adds a traceback entry,
        # 0.15 us a step; here Cython ends the iteration without one.)
        cdef PyObject* result = NULL
        cdef PySendResult status = self._step(None, &result)
        out = <object>result
        Py_XDECREF(result)
        if status == PYGEN_RETURN:
            raise StopIteration(out) if out is not None else StopIteration
        return out

    def throw(self, typ, val=None, tb=None):
        # As steps.StepTimer.throw: one exception object, whichever form was used.
        if isinstance(val, BaseException):
            exc = val
        elif isinstance(typ, BaseException):
            exc = typ
        else:
            exc = typ() if val is None else typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        trace = <object>self._trace
        if trace.step_c0 != IDLE:
            return self._coro.throw(exc)
        w0 = now_ns(CLOCK_MONOTONIC)
        c0 = now_ns(CLOCK_THREAD_CPUTIME_ID)
        trace.step_w0 = w0
        trace.step_c0 = c0
        trace.begin_step(w0, c0)
        try:
            return self._coro.throw(exc)
        finally:
            if trace.step_c0 == c0:
                trace.end_step(c0, w0)

    def close(self):
        self._coro.close()

    def __iter__(self):
        return self

    def __await__(self):
        return self

    # anyio and asyncio inspect a task's coroutine; show them the real one.
    @property
    def cr_running(self):
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_suspended(self):
        return bool(getattr(self._coro, "cr_suspended", False))

    @property
    def cr_frame(self):
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_await(self):
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_code(self):
        return getattr(self._coro, "cr_code", None)

    def __getattr__(self, name):
        return getattr(self._coro, name)

    def __repr__(self):
        return f"<loopwatch step timer of {self._coro!r}>"


cdef extern from *:
    """
    static int lw_raise_current(void) { return -1; }
    """
    int raise_current "lw_raise_current"() except -1
