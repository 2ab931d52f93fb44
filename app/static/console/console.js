// mozrest-relay console: comfort only, every page works without it.
// Pages marked data-refresh="N" reload every N seconds while visible and nobody is typing.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!seconds) { return; }
  setInterval(function () {
    var active = document.activeElement;
    var typing = active && (active.tagName === "INPUT" || active.tagName === "SELECT");
    if (document.visibilityState === "visible" && !typing) { window.location.reload(); }
  }, seconds * 1000);
}());
