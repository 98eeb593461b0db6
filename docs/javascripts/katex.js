// Renders the math that pymdownx.arithmatex marks (generic mode): \( ... \) inline, \[ ... \]
// display. Runs on every page load, including mkdocs-material's instant navigation.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
