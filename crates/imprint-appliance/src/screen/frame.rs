//! An 80x25 grid of styled cells: what [`super::layout`] draws on and [`super::vt`] puts on
//! the VT. Untrusted text is reduced to printable ASCII as it is put.

/// Columns and rows of the view: the Linux console's classic size, which the large font
/// (`fbcon=font:TER16x32`) gives on a 1280x800 firmware framebuffer. Bigger screens show it in
/// their top-left corner.
pub const COLS: usize = 80;
pub const ROWS: usize = 25;

/// How a cell is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    #[default]
    Normal,
    /// The title bar: reversed.
    Title,
    /// Headings and labels: bold.
    Label,
    /// The filled part of the progress bar.
    BarDone,
    /// The rest of the progress bar.
    BarLeft,
    /// The chosen disk; the DONE banner.
    Good,
    /// The FAILED banner.
    Bad,
    /// A question waiting for an answer.
    Ask,
}

/// 80x25 styled cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    cells: Vec<(char, Style)>,
}

impl Default for Frame {
    fn default() -> Self {
        Frame {
            cells: vec![(' ', Style::Normal); COLS * ROWS],
        }
    }
}

impl Frame {
    /// Writes `text` at (`row`, `col`), clipped at the right edge; characters outside
    /// printable ASCII (firmware strings are not trusted) become `?`.
    pub fn put(&mut self, row: usize, col: usize, text: &str, style: Style) {
        if row >= ROWS {
            return;
        }
        for (i, c) in text.chars().enumerate() {
            let x = col + i;
            if x >= COLS {
                break;
            }
            let c = if c == ' ' || c.is_ascii_graphic() {
                c
            } else if matches!(c, '\u{2013}' | '\u{2014}') {
                '-'
            } else {
                '?'
            };
            self.cells[row * COLS + x] = (c, style);
        }
    }

    /// Paints `len` cells of `row` from `col` in `style`, keeping their characters.
    pub fn paint(&mut self, row: usize, col: usize, len: usize, style: Style) {
        if row >= ROWS {
            return;
        }
        for x in col..(col + len).min(COLS) {
            self.cells[row * COLS + x].1 = style;
        }
    }

    #[cfg(test)]
    /// The frame's text, one string per row, trailing spaces kept (tests and the serial
    /// mirror read it).
    pub fn text(&self) -> Vec<String> {
        self.cells
            .chunks(COLS)
            .map(|r| r.iter().map(|(c, _)| *c).collect())
            .collect()
    }

    #[cfg(test)]
    /// The style of a cell.
    pub fn style(&self, row: usize, col: usize) -> Style {
        self.cells[row * COLS + col].1
    }

    pub(crate) fn rows(&self) -> impl Iterator<Item = &[(char, Style)]> {
        self.cells.chunks(COLS)
    }
}
