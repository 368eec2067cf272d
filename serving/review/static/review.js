// Keyboard shortcuts for the review page (alignloop). No framework: htmx does the requests.
(function () {
  "use strict";
  function cards() { return Array.from(document.querySelectorAll("article.card")); }
  // The selection is kept by id, not read back from the class: when htmx swaps a card it
  // restores the new card's own class attribute 20 ms later (its settle step), which drops
  // "selected"; afterSettle below puts the highlight back.
  var currentId = null;
  function selected() { return currentId ? document.getElementById(currentId) : null; }
  function select(card) {
    cards().forEach(function (c) { c.classList.remove("selected"); });
    currentId = card ? card.id : null;
    if (card) { card.classList.add("selected"); card.scrollIntoView({block: "nearest"}); }
  }
  function move(step) {
    var all = cards(), cur = all.indexOf(selected());
    select(all[Math.max(0, Math.min(all.length - 1, cur + step))]);
  }
  function scope() { return selected() || document.querySelector("main"); }

  document.addEventListener("keydown", function (ev) {
    var t = ev.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.tagName === "SELECT")) {
      if (t.tagName === "TEXTAREA" && ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        htmx.trigger(t.form, "submit");
      } else if (ev.key === "Escape") { t.blur(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    if (ev.key === "j") { move(1); return; }
    if (ev.key === "k") { move(-1); return; }
    var target = scope().querySelector('[data-key="' + ev.key + '"]');
    if (!target) { return; }
    ev.preventDefault();
    if (target.tagName === "SUMMARY") {
      var details = target.parentElement;
      details.open = true;
      var area = details.querySelector("textarea");
      if (area) { area.focus(); area.setSelectionRange(area.value.length, area.value.length); }
    } else {
      // htmx binds swapped-in buttons only after its settle delay (20 ms); a key pressed
      // sooner would click a button with no request behind it. process() is idempotent.
      htmx.process(target);
      target.click();
    }
  });

  document.addEventListener("click", function (ev) {
    var card = ev.target.closest && ev.target.closest("article.card");
    if (card) { select(card); }
  });

  // After htmx replaces a card, keep it selected; show errors of any action in the flash box.
  document.addEventListener("htmx:afterSwap", function (ev) {
    var card = ev.detail.elt.closest ? ev.detail.elt.closest("article.card") : null;
    if (card) { select(document.getElementById(card.id) || card); }
    document.getElementById("flash").innerHTML = "";
  });
  document.addEventListener("htmx:afterSettle", function () {
    var card = selected();
    if (card) { card.classList.add("selected"); }
  });
  document.addEventListener("htmx:responseError", function (ev) {
    var flash = document.getElementById("flash");
    flash.innerHTML = ev.detail.xhr.responseText || ("request failed: HTTP " + ev.detail.xhr.status);
  });

  document.addEventListener("DOMContentLoaded", function () {
    select(cards()[0]);
    var onlyDiff = document.getElementById("only-diff");
    if (onlyDiff) {
      onlyDiff.addEventListener("change", function () {
        document.querySelectorAll("table.sbs tr.same").forEach(function (row) {
          row.hidden = onlyDiff.checked;
        });
      });
    }
  });
})();
