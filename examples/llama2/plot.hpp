// The eval's plot as a self-contained SVG: three panels (KL on a log axis, top-1 agreement,
// perplexity) against the budget on a log2 axis, one polyline per policy, the full cache dashed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "eval.hpp"

namespace llama2 {

namespace detail {

inline std::string num(double v, const char* f = "%.4g") {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// About five round ticks (1, 2 or 5 times a power of ten) covering [lo, hi].
inline std::vector<double> linear_ticks(double lo, double hi) {
  const double raw = (hi - lo) / 5.0;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / mag < 1.5 ? mag : raw / mag < 3.5 ? 2 * mag : raw / mag < 7.5 ? 5 * mag : 10 * mag;
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + 1e-9 * step; t += step) ticks.push_back(t);
  return ticks;
}

inline std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return o;
}

struct Panel {
  std::string title;
  std::function<double(const EvalRow&)> value;
  bool log_y = false;
};

}  // namespace detail

inline void write_svg(std::ostream& out, const EvalResult& r, const std::string& title) {
  using detail::num;
  constexpr double kW = 330, kH = 335, kLeft = 60, kRight = 15, kTop = 90, kBottom = 45;  // one panel, px
  static const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                                  "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#ad494a"};
  constexpr std::size_t kNumColors = sizeof(kColors) / sizeof(kColors[0]);
  constexpr std::size_t kLegendColumns = 6;  // entries per legend row, 160 px each
  const std::vector<detail::Panel> panels = {
      {"mean KL(full ‖ policy), nats", [](const EvalRow& x) { return x.quality.kl; }, true},
      {"top-1 agreement with full", [](const EvalRow& x) { return x.quality.top1; }, false},
      {"perplexity (log axis)", [](const EvalRow& x) { return x.quality.ppl; }, true},
  };
  std::map<std::string, std::vector<const EvalRow*>> lines;  // bounded policies, by name
  std::vector<std::string> order;
  const EvalRow* full = nullptr;
  std::vector<std::int64_t> budgets;
  for (const auto& row : r.rows) {
    if (row.policy == "full") {
      full = &row;
      continue;
    }
    if (!lines.contains(row.policy)) order.push_back(row.policy);
    lines[row.policy].push_back(&row);
    budgets.push_back(row.budget);
  }
  std::sort(budgets.begin(), budgets.end());
  budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());
  const double total_w = kW * static_cast<double>(panels.size());
  out << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << total_w << "\" height=\"" << kH + 20
      << "\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << total_w / 2 << "\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">" << detail::xml_escape(title) << "</text>\n";
  // Legend, under the title, wrapped into rows.
  auto legend_x = [](std::size_t i) { return 20.0 + 160.0 * static_cast<double>(i % kLegendColumns); };
  auto legend_y = [](std::size_t i) { return 38.0 + 16.0 * static_cast<double>(i / kLegendColumns); };
  for (std::size_t i = 0; i < order.size(); ++i)
    out << "<line x1=\"" << legend_x(i) << "\" y1=\"" << legend_y(i) << "\" x2=\"" << legend_x(i) + 24 << "\" y2=\""
        << legend_y(i) << "\" stroke=\"" << kColors[i % kNumColors] << "\" stroke-width=\"2\"/><text x=\"" << legend_x(i) + 30
        << "\" y=\"" << legend_y(i) + 4 << "\">" << detail::xml_escape(order[i]) << "</text>\n";
  if (full != nullptr) {
    const std::size_t i = order.size();
    out << "<line x1=\"" << legend_x(i) << "\" y1=\"" << legend_y(i) << "\" x2=\"" << legend_x(i) + 24 << "\" y2=\""
        << legend_y(i) << "\" stroke=\"gray\" stroke-dasharray=\"4 3\"/><text x=\"" << legend_x(i) + 30 << "\" y=\""
        << legend_y(i) + 4 << "\">full cache</text>\n";
  }
  if (budgets.empty()) {
    out << "</svg>\n";
    return;
  }

  const double bx0 = std::log2(static_cast<double>(budgets.front())), bx1 = std::log2(static_cast<double>(budgets.back()));
  for (std::size_t p = 0; p < panels.size(); ++p) {
    const detail::Panel& panel = panels[p];
    const double x0 = kW * static_cast<double>(p) + kLeft, x1 = kW * static_cast<double>(p + 1) - kRight;
    const double y0 = kTop, y1 = kH - kBottom + 20;
    // y range: the data (and the full-cache reference), decades on the log axis.
    double lo = 1e300, hi = -1e300;
    for (const auto& [name, rows] : lines)
      for (const EvalRow* row : rows) {
        const double v = panel.value(*row);
        if (panel.log_y && !(v > 0)) continue;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
    if (full != nullptr && !panel.log_y) {
      lo = std::min(lo, panel.value(*full));
      hi = std::max(hi, panel.value(*full));
    }
    if (lo > hi) lo = hi = panel.log_y ? 1.0 : 0.0;
    std::vector<double> ticks;
    if (panel.log_y) {
      lo = std::floor(std::log10(lo));
      hi = std::max(std::ceil(std::log10(hi)), lo + 1);
      for (double e = lo; e <= hi; ++e) ticks.push_back(e);
    } else {
      const double pad = hi > lo ? 0.05 * (hi - lo) : 0.5;
      ticks = detail::linear_ticks(lo - pad, hi + pad);
      lo = std::min(lo - pad, ticks.front());
      hi = std::max(hi + pad, ticks.back());
    }
    const double inset = 0.06 * (x1 - x0);  // keeps the first and last budgets off the frame
    auto sx = [&](double budget) {
      return bx1 > bx0 ? x0 + inset + (std::log2(budget) - bx0) / (bx1 - bx0) * (x1 - x0 - 2 * inset) : (x0 + x1) / 2;
    };
    auto sy = [&](double v) {
      const double t = panel.log_y ? std::log10(std::max(v, std::pow(10.0, lo))) : v;
      return y1 - (t - lo) / (hi - lo) * (y1 - y0);
    };
    out << "<g>\n<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << y0 - 8 << "\" text-anchor=\"middle\" font-size=\"12\">"
        << panel.title << "</text>\n<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << x1 - x0 << "\" height=\"" << y1 - y0
        << "\" fill=\"none\" stroke=\"black\"/>\n";
    for (double t : ticks) {
      const double y = panel.log_y ? sy(std::pow(10.0, t)) : sy(t);
      const std::string label = panel.log_y ? "1e" + num(t, "%.0f") : num(t);
      out << "<line x1=\"" << x0 << "\" y1=\"" << y << "\" x2=\"" << x1 << "\" y2=\"" << y << "\" stroke=\"#ddd\"/>"
          << "<text x=\"" << x0 - 4 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << label << "</text>\n";
    }
    for (std::int64_t b : budgets) {
      const double x = sx(static_cast<double>(b));
      out << "<line x1=\"" << x << "\" y1=\"" << y1 << "\" x2=\"" << x << "\" y2=\"" << y1 + 4 << "\" stroke=\"black\"/>"
          << "<text x=\"" << x << "\" y=\"" << y1 + 16 << "\" text-anchor=\"middle\">" << b << "</text>\n";
    }
    out << "<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << y1 + 32 << "\" text-anchor=\"middle\">budget (entries per layer and kv-head)</text>\n";
    if (full != nullptr && !panel.log_y) {
      const double y = sy(panel.value(*full));
      out << "<line x1=\"" << x0 << "\" y1=\"" << y << "\" x2=\"" << x1 << "\" y2=\"" << y
          << "\" stroke=\"gray\" stroke-dasharray=\"4 3\"/>\n";
    }
    for (std::size_t i = 0; i < order.size(); ++i) {
      std::vector<const EvalRow*> rows = lines[order[i]];
      std::sort(rows.begin(), rows.end(), [](const EvalRow* a, const EvalRow* b) { return a->budget < b->budget; });
      std::string points;
      for (const EvalRow* row : rows) {
        const double x = sx(static_cast<double>(row->budget)), y = sy(panel.value(*row));
        points += num(x, "%.1f") + "," + num(y, "%.1f") + " ";
        out << "<circle cx=\"" << num(x, "%.1f") << "\" cy=\"" << num(y, "%.1f") << "\" r=\"3\" fill=\"" << kColors[i % kNumColors] << "\"/>\n";
      }
      out << "<polyline points=\"" << points << "\" fill=\"none\" stroke=\"" << kColors[i % kNumColors] << "\" stroke-width=\"2\"/>\n";
    }
    out << "</g>\n";
  }
  out << "</svg>\n";
}

}  // namespace llama2
