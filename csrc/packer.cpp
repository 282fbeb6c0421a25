// adapt_fast._native_packer: C++17 twin of adapt_fast/data/pack.py (identical output).
//
// best_fit_pack(lengths, capacities, priority) -> (n,) int64 bin index or -1
//   order: priority first, then length descending, then index ascending (stable sort);
//   each item goes to the bin with the smallest remaining >= its length, lowest index on ties.
//   Bins live in an ordered set keyed by (remaining, bin): lower_bound((L, -1)) is the best fit.
// cut_to_budget(counts, remaining) -> (n_keep, last_take)
//   see the Python docstring; remaining == 0 or n == 0 gives (0, 0).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;
using i64 = std::int64_t;
template <typename T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

static void check_1d(const py::array& a, const char* name) {
    if (a.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be 1-D");
}

// Item indices by (priority first, length descending, index ascending). Token lengths are small
// integers, so a stable counting sort over (priority, length) buckets does it in O(n + max length);
// a stable comparison sort covers huge lengths.
static std::vector<i64> processing_order(const i64* len, const bool* prio, i64 n) {
    std::vector<i64> order(n);
    const i64 maxlen = *std::max_element(len, len + n);
    if (maxlen > std::max<i64>(i64(1) << 16, 4 * n)) {
        std::iota(order.begin(), order.end(), i64(0));
        std::stable_sort(order.begin(), order.end(), [&](i64 a, i64 b) {
            if (prio[a] != prio[b]) return prio[a];
            return len[a] > len[b];
        });
        return order;
    }
    auto bucket = [&](i64 i) { return (prio[i] ? 0 : maxlen + 1) + (maxlen - len[i]); };
    std::vector<i64> start(2 * (maxlen + 1) + 1, 0);
    for (i64 i = 0; i < n; ++i) ++start[bucket(i) + 1];
    for (size_t k = 1; k < start.size(); ++k) start[k] += start[k - 1];
    for (i64 i = 0; i < n; ++i) order[start[bucket(i)]++] = i;  // index order within a bucket
    return order;
}

static void best_fit_core(const i64* len, const bool* prio, i64 n, const i64* caps, i64 W, i64* out) {
    std::fill(out, out + n, i64(-1));
    if (n == 0 || W == 0) return;

    const std::vector<i64> order = processing_order(len, prio, n);
    // suffix_min[i]: the shortest item from position i on (early exit once nothing fits).
    std::vector<i64> suffix_min(n + 1, INT64_MAX);
    for (i64 i = n - 1; i >= 0; --i) suffix_min[i] = std::min(suffix_min[i + 1], len[order[i]]);

    std::set<std::pair<i64, i64>> bins;  // (remaining, bin)
    for (i64 b = 0; b < W; ++b) bins.emplace(caps[b], b);

    for (i64 i = 0; i < n; ++i) {
        const i64 L = len[order[i]];
        auto it = bins.lower_bound({L, i64(-1)});
        if (it == bins.end()) {
            if (bins.rbegin()->first < suffix_min[i + 1]) break;  // no later item fits either
            continue;
        }
        auto node = bins.extract(it);  // re-key without reallocating
        out[order[i]] = node.value().second;
        node.value().first -= L;
        bins.insert(std::move(node));
    }
}

static carray<i64> best_fit_pack(carray<i64> lengths, carray<i64> capacities, std::optional<carray<bool>> priority) {
    check_1d(lengths, "lengths");
    check_1d(capacities, "bin_capacities");
    const i64 n = lengths.shape(0), W = capacities.shape(0);
    const i64* len = lengths.data();
    const i64* caps = capacities.data();
    bool bad = false;
    for (i64 i = 0; i < n; ++i) bad |= len[i] <= 0;
    if (bad) throw std::invalid_argument("lengths must all be > 0");
    for (i64 b = 0; b < W; ++b) bad |= caps[b] < 0;
    if (bad) throw std::invalid_argument("bin_capacities must all be >= 0");

    std::unique_ptr<bool[]> zeros;  // all-false priority when none is given
    const bool* prio;
    if (priority.has_value()) {
        check_1d(*priority, "priority");
        if (priority->shape(0) != n) throw std::invalid_argument("priority must have the same length as lengths");
        prio = priority->data();
    } else {
        zeros.reset(new bool[static_cast<size_t>(n) + 1]());
        prio = zeros.get();
    }

    carray<i64> out(n);
    i64* o = out.mutable_data();
    {
        py::gil_scoped_release release;
        best_fit_core(len, prio, n, caps, W, o);
    }
    return out;
}

static std::pair<i64, i64> cut_to_budget(carray<i64> counts, i64 remaining) {
    check_1d(counts, "counts");
    if (remaining < 0) throw std::invalid_argument("remaining must be >= 0");
    const i64 n = counts.shape(0);
    const i64* c = counts.data();
    i64 total = 0;
    bool negative = false;
    for (i64 i = 0; i < n; ++i) {  // one vectorizable pass: check and sum
        total += c[i];
        negative |= c[i] < 0;
    }
    if (negative) throw std::invalid_argument("counts must all be >= 0");
    if (n == 0 || remaining == 0) return {0, 0};
    if (total <= remaining) return {n, c[n - 1]};  // everything fits, trailing zeros included
    i64 cum = 0;
    i64 i = 0;
    while (cum + c[i] < remaining) cum += c[i++];  // stops at the item that reaches the budget
    return {i + 1, remaining - cum};
}

PYBIND11_MODULE(_native_packer, m) {
    m.doc() = "Native packing placement primitives (see adapt_fast/data/pack.py).";
    m.def("best_fit_pack", &best_fit_pack, py::arg("lengths"), py::arg("bin_capacities"),
          py::arg("priority") = py::none(),
          "Best-fit placement; returns (n,) int64 bin index per item or -1.");
    m.def("cut_to_budget", &cut_to_budget, py::arg("counts"), py::arg("remaining"),
          "Returns (n_keep, last_take) so the kept total is min(remaining, counts.sum()).");
}
