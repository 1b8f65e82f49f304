// Keeps the brand page's "propagation" field current while the worker runs.
"use strict";
window.addEventListener("load", function () {
  const status = document.getElementById("propagation-status");
  if (!status) return;
  const url = status.dataset.url;
  function show(lines) {
    const rows = lines.map(function (line, i) {
      const row = document.createElement(i === 0 ? "strong" : "div");
      row.textContent = line;
      return row;
    });
    status.replaceChildren(...rows);
  }
  async function refresh() {
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.ok) show((await response.json()).lines);
    } catch (error) {
      // The server restarting is no reason for an alert; the next tick tries again.
    }
    setTimeout(refresh, 500);
  }
  refresh();
});
