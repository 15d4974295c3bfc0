// Builds the index table from window.RL_FEATURES (set by data/features.js), with sorting and search.
(function () {
  "use strict";
  var features = window.RL_FEATURES || [];
  var tbody = document.querySelector("#rl-table tbody");
  var search = document.getElementById("rl-search");
  var count = document.getElementById("rl-count");
  var maxDensity = features.reduce(function (m, f) { return Math.max(m, f.density); }, 0) || 1;
  var hasWins = features.some(function (f) { return f.win_rate !== null; });

  function fmt(x) { return x === null ? "–" : Number(x.toPrecision(4)).toString(); }

  function tokens(list) {
    var cell = document.createElement("td");
    list.forEach(function (t) {
      var span = document.createElement("span");
      span.className = "tok";
      span.textContent = t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
      cell.appendChild(span);
    });
    return cell;
  }

  function cell(text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  var rows = features.map(function (f) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-feature", f.feature);
    var link = document.createElement("a");
    link.href = "features/feature_" + f.feature + ".html";
    link.textContent = f.feature;
    var first = document.createElement("td");
    first.appendChild(link);
    tr.appendChild(first);
    var density = cell("", "rl-density");
    var bar = document.createElement("span");
    bar.className = "rl-bar";
    bar.style.width = (f.density > 0 ? Math.max(1, 60 * f.density / maxDensity) : 0) + "px";
    density.appendChild(bar);
    density.appendChild(document.createTextNode(f.density > 0 ? (100 * f.density).toPrecision(3) + "%" : "0%"));
    density.setAttribute("data-value", f.density);
    tr.appendChild(density);
    var max = cell(fmt(f.max_activation), "rl-max");
    max.setAttribute("data-value", f.max_activation);
    tr.appendChild(max);
    tr.appendChild(tokens(f.top_tokens));
    tr.appendChild(tokens(f.promoted));
    if (hasWins) tr.appendChild(cell(f.win_rate === null ? "–" : (100 * f.win_rate).toPrecision(3) + "%"));
    var text = [f.feature].concat(f.top_tokens, f.promoted).join(" ").toLowerCase();
    return { feature: f, row: tr, text: text };
  });
  if (!hasWins) {
    var th = document.querySelector('#rl-table th[data-key="win_rate"]');
    th.parentNode.removeChild(th);
  }

  function render() {
    var q = search.value.trim().toLowerCase();
    var shown = 0;
    tbody.textContent = "";
    rows.forEach(function (r) {
      if (!q || r.text.indexOf(q) >= 0) { tbody.appendChild(r.row); shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " features";
  }

  function value(f, key) {
    var v = f[key];
    if (Array.isArray(v)) return v.join(" ");
    return v === null ? -Infinity : v;
  }

  document.querySelectorAll("#rl-table th").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      var descending = th.getAttribute("aria-sort") !== "descending";
      document.querySelectorAll("#rl-table th").forEach(function (o) { o.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      rows.sort(function (a, b) {
        var x = value(a.feature, key), y = value(b.feature, key);
        var c = typeof x === "string" ? x.localeCompare(y) : (x < y ? -1 : x > y ? 1 : 0);
        if (c === 0) c = a.feature.feature - b.feature.feature;
        return descending ? -c : c;
      });
      render();
    });
  });
  search.addEventListener("input", render);
  render();
})();
